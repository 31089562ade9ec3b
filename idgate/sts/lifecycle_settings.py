"""Settings of tasks, revocation and session-end signals, hung under `Config`.

`liveness`, `tasks`, `admin`, `introspection`, `backchannel_logout` and `ssf`.
Only pydantic is imported here: `idgate.config` imports this module (see the
`idgate.sts` package docstring).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AdminSettings",
    "BackchannelLogoutSettings",
    "IntrospectionSettings",
    "LivenessSettings",
    "SsfSettings",
    "SsfTransmitter",
    "TasksSettings",
    "issuer_qualified",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def issuer_qualified(values: tuple[str, ...]) -> tuple[str, ...]:
    """Each entry `ISSUER:VALUE`: the name of a configured issuer (or `idgate`, `dev`), then a subject id or
    a group. A subject id alone is refused: the same id from another trusted issuer is someone else."""
    for value in values:
        name, sep, rest = value.partition(":")
        if not sep or not name or not rest or not all(c.isalnum() or c in "_.-" for c in name):
            raise ValueError(
                f"`{value[:80]}` must be `ISSUER:VALUE`: the name of a configured issuer, `:`, then the subject "
                "id or group (e.g. `corp:alice`)"
            )
    return values


class LivenessSettings(_Frozen):
    """How each worker keeps its view of revocations current (see idgate/sts/revocation.py)."""

    poll_interval_seconds: float = Field(
        0.05, gt=0, le=1, description="how often a worker reads what changed in the state store"
    )
    max_staleness_seconds: float = Field(
        1.0,
        gt=0,
        le=60,
        description="a worker whose view is older than this refuses calls with 503 (fail closed)",
    )
    retention_seconds: int = Field(
        86400,
        gt=0,
        description="how long a revocation is kept: at least the longest lifetime of any token accepted",
    )


class TasksSettings(_Frozen):
    default_lifetime_seconds: int = Field(3600, gt=0, description="lifetime of a task that asks for none")
    max_lifetime_seconds: int = Field(
        86400, gt=0, description="longest lifetime of a task; a longer request is capped to it"
    )


class AdminSettings(_Frozen):
    """Administrators: may complete any task and use the kill switch (`POST /admin/revoke`).

    Issuer-qualified (`ISSUER:SUBJECT`, `ISSUER:GROUP`): an id or a group name means something only
    at the issuer that vouches for it."""

    subjects: tuple[str, ...] = Field((), description="administrators, each `ISSUER:SUBJECT` (issuer by name)")
    groups: tuple[str, ...] = Field(
        (), description="members of these groups are administrators, each `ISSUER:GROUP` (issuer by name)"
    )

    _qualified = field_validator("subjects", "groups")(issuer_qualified)


class IntrospectionSettings(_Frozen):
    """Resource servers that may ask `POST /oauth2/introspect` (RFC 7662), by their bearer token."""

    allowed_subjects: tuple[str, ...] = Field(
        (), description="subjects that may introspect, each `ISSUER:SUBJECT` (issuer by name)"
    )
    allowed_groups: tuple[str, ...] = Field(
        (), description="members of these groups may introspect, each `ISSUER:GROUP` (issuer by name)"
    )

    _qualified = field_validator("allowed_subjects", "allowed_groups")(issuer_qualified)


class BackchannelLogoutSettings(_Frozen):
    """OpenID Connect Back-Channel Logout 1.0 at `POST /oauth2/backchannel-logout`."""

    issuers: tuple[str, ...] = Field(
        (), description="names of configured `issuers` whose logout tokens are accepted; none: the endpoint is off"
    )
    audiences: tuple[str, ...] = Field(
        (), description="the gateway's client ids at those issuers (the logout token's `aud`); default the audiences"
    )
    max_age_seconds: int = Field(300, gt=0, le=3600, description="how old a logout token's `iat` may be")


class SsfTransmitter(_Frozen):
    """A Shared Signals transmitter whose CAEP events are accepted at `POST /ssf/events` (RFC 8935 push)."""

    issuer: str = Field(description="the transmitter's `iss`")
    jwks_file: Path | None = None
    jwks_uri: str | None = None
    audience: str = Field(description="the `aud` its events carry for this gateway")
    issuers: tuple[str, ...] = Field(
        min_length=1,
        description="names of configured `issuers` whose subjects and sessions its events may end (no other's)",
    )

    @model_validator(mode="after")
    def _keys(self) -> SsfTransmitter:
        if (self.jwks_file is None) == (self.jwks_uri is None):
            raise ValueError("give exactly one of `jwks_file` or `jwks_uri`")
        return self


class SsfSettings(_Frozen):
    transmitters: tuple[SsfTransmitter, ...] = Field((), description="none: the receiver is off")
    max_age_seconds: int = Field(300, gt=0, le=3600, description="how old an event's `iat` may be")
