"""From an `Authorization` header to a verified `Caller`.

The steps, each a refusal when it fails: a well-formed compact JWS; no key
carried by the token itself (`jwk`, `jku`, `x5u`, `x5c`); a trusted issuer (by `iss`,
or by the trust domain of a SPIFFE ID in `sub`); an algorithm that issuer
allows (never `none`, HMAC only when configured); a known key; a valid
signature; `exp`, `nbf`, `iat` within the clock skew; an accepted audience.

A verified token is cached by its SHA-256 until it expires, so the hot path
does not verify signatures again; a cache hit still checks expiry and that the
signing key has not been removed from the issuer's key set (also for a token
without `kid`, verified by the issuer's only key: the cache remembers which).

The token comes as `Authorization: Bearer TOKEN` or, for a DPoP-bound token,
`Authorization: DPoP TOKEN` (RFC 9449 §7.1); which scheme fits which token is
the DPoP check's business (`idgate.identity.dpop.DPoPCheck`), not this one's.

`verify_assertion` checks a token presented *to the token service* (a client's
JWT-SVID, a JWT-bearer grant's assertion) the same way, except that the
audience is the token service's and nothing is cached (such tokens are one-time).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from joserfc import jws
from joserfc.errors import JoseError

from idgate.errors import AuthenticationError, InvalidToken, MissingCredential, shown
from idgate.identity.issuers import OidcIssuer, SpiffeIssuer, TokenIssuer
from idgate.identity.principal import Caller

__all__ = ["Authenticator", "access_token", "bearer_token"]

_EMBEDDED_KEY_HEADERS = ("jwk", "jku", "x5u", "x5c")


def bearer_token(authorization: bytes | None) -> str:
    """The token of an `Authorization: Bearer ...` header value."""
    if not authorization:
        raise MissingCredential("no bearer token; send `Authorization: Bearer TOKEN`")
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise MissingCredential("no bearer token; send `Authorization: Bearer TOKEN`")
    return token


def access_token(authorization: bytes | None) -> str:
    """The token of an `Authorization: Bearer ...` or `Authorization: DPoP ...` header value."""
    if authorization:
        scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
        token = token.strip()
        if scheme.lower() in ("bearer", "dpop") and token:
            return token
    raise MissingCredential("no bearer token; send `Authorization: Bearer TOKEN`")


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidToken(f"token {what} is not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise InvalidToken(f"token {what} is not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class _Verified:
    caller: Caller
    expires_at: float
    issuer: TokenIssuer
    kid: str | None


class Authenticator:
    """Verifies bearer tokens against the trusted issuers."""

    def __init__(
        self,
        issuers: Sequence[TokenIssuer],
        *,
        clock_skew: float = 60.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
        resource_metadata: str | None = None,
    ) -> None:
        """`resource_metadata`: the RFC 9728 metadata URL every refusal points clients to."""
        self._by_iss = {i.issuer: i for i in issuers if isinstance(i, OidcIssuer)}
        self._by_domain = {i.trust_domain: i for i in issuers if isinstance(i, SpiffeIssuer)}
        self._skew = self.clock_skew = clock_skew  # seconds `exp`, `nbf` and `iat` may be off by
        self._clock = clock
        self._cache: dict[bytes, _Verified] = {}
        self._cache_size = cache_size
        self._next_sweep = 0.0
        self._resource_metadata = resource_metadata

    async def authenticate(self, authorization: bytes | None) -> Caller:
        try:
            token = access_token(authorization)
            digest = hashlib.sha256(token.encode()).digest()
            now = self._clock()
            hit = self._cache.get(digest)
            if hit is not None:
                if now <= hit.expires_at + self._skew and (hit.kid is None or hit.issuer.keys.has(hit.kid)):
                    return hit.caller
                del self._cache[digest]
            verified = await self._verify(token, digest, now)
        except AuthenticationError as refusal:
            refusal.resource_metadata = self._resource_metadata
            raise
        self._remember(digest, verified, now)
        return verified.caller

    async def verify_assertion(self, token: str, audiences: frozenset[str]) -> tuple[Caller, dict[str, Any]]:
        """Verify a token whose audience must be one of `audiences`; its caller and claims. Not cached."""
        digest = hashlib.sha256(token.encode()).digest()
        verified = await self._verify(token, digest, self._clock(), audiences)
        return verified.caller, _b64json(token.split(".")[1], "payload")

    async def _verify(
        self, token: str, digest: bytes, now: float, audiences: frozenset[str] | None = None
    ) -> _Verified:
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("token is not a JWT (expected three `.`-separated parts)")
        header = _b64json(parts[0], "header")
        claims = _b64json(parts[1], "payload")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise InvalidToken("unsigned tokens (`alg: none`) are not accepted")
        embedded = [h for h in _EMBEDDED_KEY_HEADERS if h in header]
        if embedded:
            raise InvalidToken(f"tokens that carry their own key (`{embedded[0]}`) are not accepted")
        if header.get("crit"):
            raise InvalidToken("token has critical header parameters this gateway does not understand")
        issuer = self._issuer(claims)
        if alg not in issuer.algorithms:
            allowed = ", ".join(sorted(issuer.algorithms))
            raise InvalidToken(
                f"algorithm `{shown(alg)}` is not allowed for issuer `{issuer.name}`; allowed: {allowed}"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("token header `kid` must be a string")
        if isinstance(issuer, SpiffeIssuer):
            self._check_svid_header(header, kid)
        key_id, key = await issuer.key(alg, kid)
        try:
            jws.deserialize_compact(token, key, algorithms=[alg])
        except (JoseError, ValueError, TypeError):
            raise InvalidToken("token signature is invalid") from None
        expires_at = self._check_times(claims, now)
        if audiences is None:
            issuer.check_audience(claims)
        else:
            aud = claims.get("aud")
            values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if audiences.isdisjoint(v for v in values if isinstance(v, str)):
                expected = ", ".join(f"`{a}`" for a in sorted(audiences))
                raise InvalidToken(f"token audience `{shown(aud)}` is not accepted here; expected {expected}")
        caller = issuer.caller(claims, "sha256:" + digest[:8].hex(), expires_at)
        return _Verified(caller, expires_at, issuer, key_id)

    def _issuer(self, claims: dict[str, Any]) -> TokenIssuer:
        iss = claims.get("iss")
        if isinstance(iss, str) and iss in self._by_iss:
            return self._by_iss[iss]
        sub = claims.get("sub")
        if isinstance(sub, str) and sub.startswith("spiffe://"):
            domain = sub[len("spiffe://") :].split("/", 1)[0]
            if domain in self._by_domain:
                return self._by_domain[domain]
            trusted = ", ".join(f"`{d}`" for d in sorted(self._by_domain)) or "none"
            raise InvalidToken(f"SPIFFE trust domain `{shown(domain)}` is not trusted; trusted: {trusted}")
        if not isinstance(iss, str):
            raise InvalidToken("token has no issuer (`iss`)")
        trusted = ", ".join(f"`{i.name}`" for i in self._by_iss.values()) or "none"
        raise InvalidToken(f"issuer `{shown(iss)}` is not trusted; trusted issuers: {trusted}")

    @staticmethod
    def _check_svid_header(header: dict[str, Any], kid: str | None) -> None:
        if kid is None:
            raise InvalidToken("JWT-SVID header has no `kid`")
        typ = header.get("typ")
        if typ is not None and typ not in ("JWT", "JOSE"):
            raise InvalidToken(f"JWT-SVID header `typ` `{shown(typ)}` must be `JWT` or `JOSE`")

    def _check_times(self, claims: dict[str, Any], now: float) -> float:
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise InvalidToken("token has no expiry (`exp`)")
        if now > exp + self._skew:
            raise InvalidToken("token has expired")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InvalidToken(f"token claim `{name}` must be a number")
            if value > now + self._skew:
                raise InvalidToken("token is not valid yet" if name == "nbf" else "token was issued in the future")
        return float(exp)

    def _remember(self, digest: bytes, verified: _Verified, now: float) -> None:
        if len(self._cache) >= self._cache_size:
            # A full cache drops expired tokens at most once a second (the sweep reads every entry:
            # doing it per insert let a caller with many valid tokens slow every exchange down),
            # and otherwise the oldest entries.
            if now >= self._next_sweep:
                self._next_sweep = now + 1.0
                for key in [k for k, v in self._cache.items() if now > v.expires_at + self._skew]:
                    del self._cache[key]
            while len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = verified
