"""Resource-bound tokens (RFC 8707): a token for one MCP server is good there, and nowhere else.

An MCP client asks the token service for a token with `resource` set to the MCP
server's URL at the gateway (`{gateway}/mcp/{name}`), and gets a token whose
`aud` is that resource alone. The issuers accept every MCP resource as an
audience of the gateway (`idgate.mcp.wiring.with_mcp_audiences`), so the
audience check of the signature stage alone would let such a token in at every
endpoint. This per-call check (a `CredentialCheck` of the `Gate`) keeps it where
it belongs: a token whose audiences are all MCP resources is refused outside
`/mcp/` (the OpenAI-compatible API, tasks, the kill switch...); which MCP server
it is good at is checked by the MCP gateway itself. A token for the gateway as a
whole (its default audience) is good everywhere, as before.
"""

from __future__ import annotations

import base64
import binascii

import orjson

from idgate.errors import InvalidToken
from idgate.identity.principal import Caller
from idgate.proxy.http import Request

__all__ = ["ResourceAudiences", "token_audiences"]


def token_audiences(authorization: bytes | None) -> frozenset[str]:
    """The `aud` of the request's token (verified already by the gate: the payload is the signed one)."""
    if not authorization:
        return frozenset()
    token = authorization.decode("latin-1").strip().partition(" ")[2].strip()
    parts = token.split(".")
    if len(parts) != 3:
        return frozenset()
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return frozenset()
    aud = claims.get("aud") if isinstance(claims, dict) else None
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    return frozenset(v for v in values if isinstance(v, str))


class ResourceAudiences:
    """Refuses, outside `prefix`, a token whose every audience is one of `resources` (MCP servers)."""

    def __init__(self, resources: tuple[str, ...], prefix: str = "/mcp/") -> None:
        self._resources = frozenset(resources)
        self._prefix = prefix

    async def __call__(self, caller: Caller, request: Request) -> None:
        if not self._resources or request.path.startswith(self._prefix):
            return
        audiences = token_audiences(request.header(b"authorization"))
        if audiences and audiences <= self._resources:
            raise InvalidToken(
                "this token is for an MCP server only (its `aud`); ask the token service for one for the gateway"
            )
