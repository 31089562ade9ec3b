"""Settings of the token service, hung under `Config.sts`.

Only pydantic (and `idgate.secretref`, `idgate.errors`) is imported here:
`idgate.config` imports this module (see the package docstring).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from idgate.secretref import SecretRef
from idgate.sts.client_settings import ClientSettings, DPoPSettings

__all__ = ["REDIS_SCHEMES", "ReplayCacheSettings", "StsSettings", "redis_url_problem"]

REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url_problem(url: str, *, secret: bool = False) -> str | None:
    """What is wrong with a Redis URL, if anything; never quotes it (it may hold a password).

    `secret`: the URL came from a `SecretRef`, where a password belongs; in the YAML it does not.
    """
    try:
        parts = urlsplit(url)
        password, _ = parts.password, parts.port
    except ValueError:
        return "`redis_url` is not a valid URL"
    if parts.scheme not in REDIS_SCHEMES:
        return "`redis_url` must be a redis://, rediss:// or unix:// URL"
    in_query = any(name.lower() == "password" for name, _ in parse_qsl(parts.query, keep_blank_values=True))
    if not secret and (password or in_query):
        return "a Redis URL must not contain a password: give the whole URL as `{env: NAME}` or `{file: PATH}`"
    return None


class ReplayCacheSettings(BaseModel):
    """Where single-use values (DPoP proofs' and client assertions' `jti`s) are remembered across workers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["sqlite", "redis"] = Field(
        "sqlite", description="`sqlite`: STATE/replay.db, for the workers of one machine; `redis`: for every replica"
    )
    redis_url: SecretRef | str | None = Field(
        None,
        description="e.g. redis://127.0.0.1:6379/0; with a password (`redis://:PASSWORD@host`), give it as"
        " `{env: NAME}` or `{file: PATH}`",
    )
    redis_prefix: str = Field("idgate:replay:", description="prefix of the replay cache's keys in Redis")

    @field_validator("redis_url")
    @classmethod
    def _no_inline_password(cls, value: SecretRef | str | None) -> SecretRef | str | None:
        # A secret's URL is checked when it is revealed (idgate/identity/replay.py `build_replay_cache`).
        if isinstance(value, str) and (problem := redis_url_problem(value)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _redis_needs_url(self) -> ReplayCacheSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("`backend: redis` needs `redis_url`")
        return self


class StsSettings(BaseModel):
    """The token service at `/oauth2/token` and its signing keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    algorithm: Literal["ES256", "RS256"] = Field(
        "ES256", description="algorithm of newly created signing keys; existing keys keep theirs"
    )
    token_ttl_seconds: int = Field(
        300,
        gt=0,
        le=3600,
        description="lifetime of an issued token; never longer than the subject or actor token it came from",
    )
    default_audience: str | None = Field(
        None, description="audience of a token when the request names none; default the gateway's first audience"
    )
    previous_keys: int = Field(
        2, ge=0, le=10, description="keys still published (and accepted) after a rotation, newest first"
    )
    max_body_bytes: int = Field(64 * 1024, gt=0, le=1024 * 1024, description="largest token request accepted")
    clients: tuple[ClientSettings, ...] = Field((), description="registered clients (private_key_jwt or JWT-SVID)")
    client_assertion_max_lifetime_seconds: int = Field(
        300, gt=0, le=3600, description="a client assertion may expire at most this far in the future"
    )
    dpop: DPoPSettings = DPoPSettings()
    replay_cache: ReplayCacheSettings = ReplayCacheSettings()
    certificate_bound_tokens: bool = Field(
        True, description="a token requested over mTLS with a client certificate is bound to it (`cnf.x5t#S256`)"
    )
