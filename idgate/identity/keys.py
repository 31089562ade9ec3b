"""Verification keys of one issuer: fetched, cached, refetched on rotation.

Keys come from a local JWKS file, a `jwks_uri`, or OIDC discovery. They are
cached for `cache_ttl_seconds`; a token naming an unknown `kid` triggers one
refetch, at most every `refetch_interval_seconds`. A failed fetch keeps the keys
already known and never turns into an allow: with no key, there is no token.
Requests that arrive while a fetch is running wait for it and share its result
rather than queueing fetches of their own.

Only public signing keys of the set's `use` are taken. A SPIFFE trust bundle
(`use` other than `sig`) must mark each key: `"use": "jwt-svid"` keys verify
JWT-SVIDs, `x509-svid` keys and unmarked keys do not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from joserfc import jwk
from joserfc.errors import JoseError

from idgate.errors import InvalidToken, ServiceUnavailable, shown

__all__ = ["JWKSLoader", "KeySet", "file_loader", "http_loader"]

log = logging.getLogger("idgate.identity")

JWKSLoader = Callable[[], Awaitable[dict[str, Any]]]
VerifyKey = jwk.Key


def file_loader(path: Path) -> JWKSLoader:
    async def load() -> dict[str, Any]:
        try:
            data = orjson.loads(await asyncio.to_thread(path.read_bytes))
        except (OSError, orjson.JSONDecodeError) as exc:
            raise OSError(f"JWKS file `{path}` cannot be read: {exc}") from None
        if not isinstance(data, dict):
            raise OSError(f"JWKS file `{path}` is not a JSON object")
        return data

    return load


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with session.get(url, timeout=timeout, allow_redirects=False) as response:
        if response.status != 200:
            raise OSError(f"`{url}` answered {response.status}")
        data = orjson.loads(await response.read())
    if not isinstance(data, dict):
        raise OSError(f"`{url}` did not return a JSON object")
    return data


def http_loader(session: Callable[[], aiohttp.ClientSession], url: str, discovery: bool) -> JWKSLoader:
    """Fetch a JWKS from `url`, or from the `jwks_uri` of the discovery document at `url`."""

    async def load() -> dict[str, Any]:
        jwks_url = url
        if discovery:
            document = await _get_json(session(), url.rstrip("/") + "/.well-known/openid-configuration")
            if document.get("issuer") != url:
                # OpenID Connect Discovery 1.0 §4.3: the document must be the issuer's own.
                raise OSError(f"discovery document at `{url}` names another issuer: `{shown(document.get('issuer'))}`")
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise OSError(f"discovery document of `{url}` has no `jwks_uri`")
            jwks_url = jwks_uri
        return await _get_json(session(), jwks_url)

    return load


class KeySet:
    """The current verification keys of one issuer, by `kid`."""

    def __init__(
        self,
        name: str,
        loader: JWKSLoader,
        *,
        use: str = "sig",
        refetch_interval: float = 30.0,
        cache_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._loader = loader
        self._use = use
        self._refetch_interval = refetch_interval
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._keys: dict[str, VerifyKey] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._tried_at: float | None = None  # last attempt, successful or not
        self._lock = asyncio.Lock()
        self.generation = 0  # bumps whenever the set of keys changes

    def has(self, kid: str) -> bool:
        return kid in self._keys

    async def key(self, kid: str | None) -> VerifyKey:
        """The key for `kid`; refetches once when it is unknown or the cache is stale."""
        return (await self.resolve(kid))[1]

    async def resolve(self, kid: str | None) -> tuple[str, VerifyKey]:
        """The key for `kid` and its id in the set (the one key of the set when `kid` is None)."""
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at > self._cache_ttl:
            await self._refresh(force=self._fetched_at is None)
        found = self._find(kid)
        if found is None:
            await self._refresh(force=False)
            found = self._find(kid)
        if found is None:
            if not self._keys:
                raise ServiceUnavailable(f"keys of issuer `{self.name}` are not available")
            named = shown(kid) if kid is not None else "(none)"
            raise InvalidToken(f"signing key `{named}` is not known for issuer `{self.name}`")
        return found

    def _find(self, kid: str | None) -> tuple[str, VerifyKey] | None:
        if kid is None:
            # INVARIANT: without a `kid` only an issuer with exactly one key can be matched.
            return next(iter(self._keys.items())) if len(self._keys) == 1 else None
        key = self._keys.get(kid)
        return None if key is None else (kid, key)

    async def _refresh(self, force: bool) -> bool:
        """Refetch unless one was tried within the refetch interval; True if keys changed."""
        if self._lock.locked():
            async with self._lock:
                return False  # a fetch was running: its result stands for this request too
        async with self._lock:
            now = self._clock()
            if not force and self._tried_at is not None and now - self._tried_at < self._refetch_interval:
                return False
            self._tried_at = now
            try:
                document = await self._loader()
                keys = self._parse(document)
            except (TimeoutError, OSError, aiohttp.ClientError, ValueError) as exc:
                log.warning("keys of issuer %s could not be fetched: %s", self.name, exc)
                return False
            self._fetched_at = now
            changed = keys.keys() != self._keys.keys()
            self._keys = keys
            if changed:
                self.generation += 1
                log.info("keys of issuer %s: %s", self.name, sorted(keys))
            return changed

    def _parse(self, document: dict[str, Any]) -> dict[str, VerifyKey]:
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise ValueError("JWKS has no `keys` list")
        keys: dict[str, VerifyKey] = {}
        # A SPIFFE bundle must say what each key is for; a JWKS may leave `use` out.
        default_use = self._use if self._use == "sig" else None
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("use", default_use) != self._use:
                continue
            if entry.get("kty") == "oct" or "d" in entry:
                continue  # never accept symmetric or private keys from a key set
            try:
                # joserfc knows only `sig` and `enc`: the use was checked above, so import it as `sig`.
                key = jwk.import_key({**entry, "use": "sig"})
            except (JoseError, ValueError, TypeError) as exc:
                log.warning("issuer %s: key %d skipped: %s", self.name, index, exc)
                continue
            kid = entry.get("kid") or key.thumbprint()
            keys[str(kid)] = key
        return keys
