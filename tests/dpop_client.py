"""What a DPoP client does (RFC 9449), written from the RFC for the tests: a key pair, and a proof per request.

Also a client's `private_key_jwt` assertion (RFC 7523) and a JWT-SVID, signed with joserfc.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any

import orjson
from joserfc import jws, jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

__all__ = ["DPoPKey", "client_assertion", "svid"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class DPoPKey:
    """A client's DPoP key pair; `proof(...)` signs a proof for one request."""

    def __init__(self, alg: str = "ES256") -> None:
        self.alg = alg
        self.key: ECKey | RSAKey | OKPKey
        if alg == "ES256":
            self.key = ECKey.generate_key("P-256")
        elif alg == "Ed25519":
            self.key = OKPKey.generate_key("Ed25519")
        else:
            self.key = RSAKey.generate_key(2048)
        self.jwk = self.key.as_dict(private=False)
        self.jkt = self.key.thumbprint()  # RFC 7638, SHA-256

    def proof(
        self,
        method: str,
        url: str,
        *,
        token: str | None = None,
        nonce: str | None = None,
        iat: float | None = None,
        jti: str | None = None,
        header: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        body: dict[str, Any] = {
            "jti": jti or secrets.token_urlsafe(16),
            "htm": method,
            "htu": url,
            "iat": int(time.time() if iat is None else iat),
        }
        if token is not None:
            body["ath"] = _b64(hashlib.sha256(token.encode()).digest())
        if nonce is not None:
            body["nonce"] = nonce
        body.update(claims)
        for name in drop:
            body.pop(name, None)
        head = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.jwk, **(header or {})}
        return jws.serialize_compact(head, orjson.dumps(body), self.key, algorithms=[self.alg])


def client_assertion(
    key: ECKey | RSAKey,
    client_id: str,
    audience: str | list[str],
    *,
    ttl: int = 60,
    jti: str | None = None,
    alg: str = "ES256",
    **claims: Any,
) -> str:
    """A `private_key_jwt` client assertion (RFC 7523 §3)."""
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + ttl,
        "jti": jti or secrets.token_urlsafe(16),
    }
    body.update(claims)
    return jwt.encode({"alg": alg, "kid": key.kid}, {k: v for k, v in body.items() if v is not None}, key)


def svid(key: ECKey, spiffe_id: str, audience: str | list[str], *, ttl: int = 300, **claims: Any) -> str:
    """A JWT-SVID: `sub` is the SPIFFE ID, signed by a key of the trust bundle."""
    now = int(time.time())
    body = {"sub": spiffe_id, "aud": audience, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode({"alg": "ES256", "kid": key.kid, "typ": "JWT"}, body, key)
