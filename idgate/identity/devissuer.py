"""The development issuer: a local signing key in the state folder.

It exists so that `idgate serve` with no config can be tried at once:
`idgate token` mints from it. A production config turns it off, and then no
token of its is accepted and `idgate token` refuses to run.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import orjson
from joserfc import jwt
from joserfc.jwk import RSAKey

from idgate.config import Config, IssuerConfig
from idgate.errors import ConfigError
from idgate.identity.principal import Kind

__all__ = ["DevIssuer", "dev_issuer_config"]

DEV_ISSUER_NAME = "dev"
# Fixed, so that tokens do not depend on the port the gateway happens to listen on;
# the key is what ties them to this gateway: it never leaves the state folder.
DEV_ISSUER = "urn:idgate:dev"
DEV_AUDIENCE = "idgate"


def dev_issuer_config(config: Config) -> IssuerConfig:
    """The dev issuer as an ordinary trusted issuer with a local JWKS file."""
    return IssuerConfig(
        name=DEV_ISSUER_NAME,
        issuer=DEV_ISSUER,
        audiences=(DEV_AUDIENCE,),
        jwks_file=config.home / "dev-issuer.jwks.json",
        algorithms=("RS256",),
        refetch_interval_seconds=1.0,
    )


class DevIssuer:
    """Creates (once) and uses the development signing key."""

    def __init__(self, config: Config) -> None:
        if not config.dev_issuer.enabled:
            raise ConfigError(["dev_issuer.enabled: the development issuer is off in this config"])
        self._config = config
        self._issuer = dev_issuer_config(config)
        self._key_path = config.home / "dev-issuer.key.json"

    def ensure_key(self) -> RSAKey:
        """Load the key, generating it (and its public JWKS) on first use."""
        home = self._config.home
        home.mkdir(parents=True, exist_ok=True)
        if self._key_path.exists():
            return RSAKey.import_key(orjson.loads(self._key_path.read_bytes()))
        key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"})
        key.ensure_kid()
        tmp = self._key_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(orjson.dumps(key.as_dict(private=True)))
        jwks = {"keys": [key.as_dict(private=False)]}
        assert self._issuer.jwks_file is not None
        self._issuer.jwks_file.write_bytes(orjson.dumps(jwks))
        os.replace(tmp, self._key_path)
        return key

    def mint(
        self,
        subject: str,
        *,
        kind: Kind = "human",
        tenant: str | None = None,
        actors: tuple[str, ...] = (),
        groups: tuple[str, ...] = (),
        task: str | None = None,
        ttl: int = 3600,
        now: float | None = None,
    ) -> str:
        """A signed token; `actors` are the agents acting for `subject`, outermost first."""
        limit = self._config.dev_issuer.max_ttl_seconds
        if not 0 < ttl <= limit:
            raise ConfigError([f"ttl `{ttl}` must be between 1 and {limit} seconds"])
        key = self.ensure_key()
        issued = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": self._issuer.issuer,
            "sub": subject,
            "aud": DEV_AUDIENCE,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl,
            "jti": secrets.token_urlsafe(12),
            "kind": kind,
            "tenant": tenant or self._config.dev_issuer.tenant,
        }
        if groups:
            claims["groups"] = list(groups)
        if task:
            claims["task"] = task
        act: dict[str, Any] | None = None
        for actor in reversed(actors):
            act = {"sub": actor} if act is None else {"sub": actor, "act": act}
        if act is not None:
            claims["act"] = act
        return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, claims, key)
