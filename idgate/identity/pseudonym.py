"""The caller as upstream providers see it: an opaque, stable pseudonym.

HMAC-SHA256 of the issuer and subject under a key kept in the state folder: the
same person gets the same id across requests (providers use it for abuse
signals), and nobody without the key can tell who it is.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from idgate.identity.principal import Principal

__all__ = ["Pseudonyms"]


# Pseudonyms remembered; past this many, the oldest is forgotten (and computed again if needed).
_REMEMBERED = 10_000


class Pseudonyms:
    def __init__(self, key: bytes) -> None:
        self._key = key
        # why: the same few callers make most requests, and a dict hit costs a tenth of the HMAC.
        self._known: dict[tuple[str, str], str] = {}

    @classmethod
    def from_state(cls, home: Path) -> Pseudonyms:
        path = home / "pseudonym.key"
        if not path.exists():
            home.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # first writer wins; other workers read its key
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return cls(bytes.fromhex(path.read_text().strip()))

    def of(self, principal: Principal) -> str:
        who = (principal.issuer, principal.id)
        known = self._known.get(who)
        if known is not None:
            return known
        message = f"{principal.issuer}\0{principal.id}".encode()
        pseudonym = "idg_" + hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]
        if len(self._known) >= _REMEMBERED:
            del self._known[next(iter(self._known))]
        self._known[who] = pseudonym
        return pseudonym
