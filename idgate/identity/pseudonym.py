"""The caller as upstream providers see it: an opaque, stable pseudonym.

HMAC-SHA256 of the issuer and subject under a key kept in the state folder: the
same person gets the same id across requests (providers use it for abuse
signals), and nobody without the key can tell who it is.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from idgate.identity.principal import Principal
from idgate.store.keyfile import state_key

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
        return cls(state_key(home, "pseudonym.key"))

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
