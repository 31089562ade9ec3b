"""Settings of client authentication and sender-constrained tokens, hung under `Config.sts`.

- `sts.clients`: the registered clients of the token service. A client proves
  who it is with a JWT it signs with its own private key (`private_key_jwt`,
  RFC 7523), checked against the public keys registered here, or with a SPIFFE
  JWT-SVID. Secrets are not supported: there is nowhere to put one.
- `sts.dpop`: DPoP (RFC 9449) proofs, at the token endpoint and on every call
  with a DPoP-bound token.

Only pydantic is imported here: `idgate.config` imports `idgate.sts.settings`,
which imports this module (see the package docstring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ASYMMETRIC",
    "JWS_ASYMMETRIC",
    "RSA_EC_ALGORITHMS",
    "ClientSettings",
    "DPoPSettings",
    "algorithms_given",
]

# The asymmetric JWS algorithms, each family once: JWT-SVIDs use the RSA and EC ones (SPIFFE).
RSA_EC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
JWS_ASYMMETRIC = (*RSA_EC_ALGORITHMS, "EdDSA")
ASYMMETRIC = (*JWS_ASYMMETRIC, "Ed25519", "Ed448")
# `Ed25519` and `Ed448` are RFC 9864's fully specified names for what `EdDSA` leaves open.
SigningAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519", "Ed448"
]
# Members of a JWK that belong to a private or symmetric key (RFC 7518 §6).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def algorithms_given(value: tuple[str, ...]) -> tuple[str, ...]:
    """A field validator for a list of allowed algorithms: an empty one would refuse everything."""
    if not value:
        raise ValueError("at least one algorithm is needed")
    return value


class ClientSettings(_Frozen):
    """A client of the token service, authenticated by a key it holds (never a secret)."""

    client_id: str = Field(
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="the client's id: `iss` and `sub` of its client assertions, or its SPIFFE ID",
    )
    jwks_file: Path | None = Field(None, description="a file with the client's public keys (JWKS)")
    jwks_uri: str | None = Field(None, description="where the client publishes its public keys (JWKS)")
    jwks: dict[str, Any] | None = Field(None, description="the client's public keys inline, as a JWKS object")
    kind: Literal["service", "agent"] = Field("service", description="what the client is, as a principal")
    tenant: str | None = Field(None, description="the client's tenant")
    scope: tuple[str, ...] = Field(
        (), description="the most scope a token of this client may carry; empty: tokens carry no scope"
    )
    audiences: tuple[str, ...] = Field(
        (), description="audiences its tokens may have; empty: the token service's default audience only"
    )
    algorithms: tuple[SigningAlgorithm, ...] = Field(
        ASYMMETRIC,  # type: ignore[arg-type]
        description="algorithms its client assertions may use (asymmetric only)",
    )

    _algorithms_given = field_validator("algorithms")(algorithms_given)

    @field_validator("jwks")
    @classmethod
    def _public_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        keys = value.get("keys")
        if not isinstance(keys, list) or not keys:
            raise ValueError("`jwks` must be a JWKS object with a non-empty `keys` list")
        for i, key in enumerate(keys):
            if not isinstance(key, dict) or key.get("kty") not in ("RSA", "EC", "OKP"):
                raise ValueError(f"jwks.keys[{i}]: an RSA, EC or OKP public key is expected")
            private = sorted(PRIVATE_MEMBERS & key.keys())
            if private:
                raise ValueError(f"jwks.keys[{i}]: private key members {private} must not be configured")
        return value

    @model_validator(mode="after")
    def _key_source(self) -> ClientSettings:
        sources = sum(x is not None for x in (self.jwks_file, self.jwks_uri, self.jwks))
        if self.client_id.startswith("spiffe://"):
            if sources:
                raise ValueError("a SPIFFE client authenticates with its JWT-SVID: give no `jwks*`")
        elif sources != 1:
            raise ValueError("give exactly one of `jwks_file`, `jwks_uri` or `jwks` (the client's public keys)")
        return self


class DPoPSettings(_Frozen):
    """DPoP proofs (RFC 9449): how fresh they must be, and whether the server hands out nonces."""

    algorithms: tuple[SigningAlgorithm, ...] = Field(
        ("ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA", "Ed25519"),
        description="algorithms a DPoP proof may use (asymmetric only)",
    )
    iat_window_seconds: int = Field(
        60, gt=0, le=600, description="a proof's `iat` may be at most this far from the gateway's clock"
    )
    require_nonce: bool = Field(
        False, description="proofs must carry a server nonce (`DPoP-Nonce` header, `use_dpop_nonce` error)"
    )
    nonce_lifetime_seconds: int = Field(300, gt=0, le=3600, description="how long a server nonce is accepted")

    _algorithms_given = field_validator("algorithms")(algorithms_given)
