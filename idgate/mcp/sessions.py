"""MCP session ids bound to the caller that opened the session.

An upstream MCP server names a session (`Mcp-Session-Id`) and trusts whoever
presents the id. Through the gateway every caller reaches the server with the
gateway's credential, so the id alone must not be enough: the client is given
`UPSTREAM_ID.MAC`, where MAC is an HMAC-SHA256 (under a key kept in the state
folder, `STATE/mcp-session.key`) of the server name, the caller's issuer and
subject, and the upstream id. Every POST, GET and DELETE that carries a session
id is checked against the caller presenting it, and the bare upstream id is
what goes upstream. Another subject's id, a forged or unknown one, is refused
(404, as the MCP transport answers for a session it does not know).

Nothing is remembered per session: every worker and replica sharing the state
folder's key checks the same way, and a restart forgets nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

from idgate.identity.principal import Caller
from idgate.store.keyfile import state_key

__all__ = ["KEY_FILE", "SessionIds"]

KEY_FILE = "mcp-session.key"


class SessionIds:
    """Wraps upstream session ids for one caller, and unwraps (checks) them."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the session key must be at least 16 bytes")
        self._key = key

    @classmethod
    def from_state(cls, home: Path) -> SessionIds:
        return cls(state_key(home, KEY_FILE))

    def _mac(self, server: str, caller: Caller, upstream_id: str) -> str:
        message = "\0".join((server, caller.subject.issuer, caller.subject.id, upstream_id)).encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def wrap(self, server: str, caller: Caller, upstream_id: str) -> str:
        """The id the client is given for the upstream's `upstream_id`."""
        return f"{upstream_id}.{self._mac(server, caller, upstream_id)}"

    def unwrap(self, server: str, caller: Caller, client_id: str) -> str | None:
        """The upstream id inside `client_id` if it was given to this caller for this server; else None."""
        upstream_id, dot, mac = client_id.rpartition(".")
        if not dot or not upstream_id:
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(server, caller, upstream_id).encode()):
            return None
        return upstream_id
