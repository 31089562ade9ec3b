"""Settings of the token service, hung under `Config.sts`.

Only pydantic is imported here: `idgate.config` imports this module (see the
package docstring).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from idgate.sts.client_settings import ClientSettings, DPoPSettings, ReplayCacheSettings

__all__ = ["StsSettings"]


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
