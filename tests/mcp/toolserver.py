"""A real MCP tool server for the tests, built with the official `mcp` SDK (streamable HTTP).

It has a read tool (`read_invoice`), a write tool (`refund`) and `whoami`, which
reports the `Authorization` header it received and the claims it verified.
Like a tool server behind idgate would, it verifies every bearer token against
the gateway's JWKS: signature, issuer, its own audience, expiry, and for a
`tools/call` that the token's scope names that one tool. It records every HTTP
request that reached it (headers and JSON-RPC body) so a test can tell what the
upstream saw, and what it did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import Message, Receive, Scope, Send


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Seen:
    """One HTTP request as the tool server received it."""

    method: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    status: int = 0  # what the server's auth layer answered (0: passed on to the SDK)
    claims: dict[str, Any] | None = None
    problem: str | None = None  # why the token check refused it


class ToolServer:
    """The SDK's MCP server on a free loopback port, in a thread, behind a token check.

    `issuer` and `jwks_url` are the gateway's; `audience` is what a token must be
    for. With `jwks_url=None` it checks nothing (a server with a static credential
    or none). `delay` slows every tool; `description` changes `read_invoice`'s.
    """

    def __init__(
        self,
        *,
        issuer: str | None = None,
        jwks_url: str | None = None,
        audience: str | None = None,
        static_token: str | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.audience = audience
        self.static_token = static_token
        self.delay = 0.0
        self.description = "Read one invoice by its id."
        self.seen: list[Seen] = []
        self._keys: KeySet | None = None
        self._mcp = self._build()
        app = self._mcp.streamable_http_app(
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False)
        )
        self._app = app
        config = uvicorn.Config(
            self._guard,
            host="127.0.0.1",
            port=self.port,
            lifespan="on",
            access_log=False,
            log_level="warning",
            interface="asgi3",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("tool server did not start")
            time.sleep(0.01)

    def _serve(self) -> None:
        with contextlib.suppress(SystemExit):
            self._server.run()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    # -- what it saw ---------------------------------------------------------------------

    def calls(self, tool: str | None = None) -> list[Seen]:
        """Requests that were `tools/call`s (of `tool`), whatever the answer."""
        found = []
        for seen in list(self.seen):
            body = seen.body or {}
            if body.get("method") != "tools/call":
                continue
            if tool is None or (body.get("params") or {}).get("name") == tool:
                found.append(seen)
        return found

    # -- the MCP server ------------------------------------------------------------------

    def _build(self) -> MCPServer:
        server = MCPServer("tools")
        owner = self

        @server.tool(description="Read one invoice by its id.")
        async def read_invoice(invoice: str) -> str:
            await asyncio.sleep(owner.delay)
            return f"invoice {invoice}: 42.00 EUR"

        @server.tool(description="Refund an invoice.")
        async def refund(invoice: str, amount: float) -> str:
            await asyncio.sleep(owner.delay)
            return f"refunded {amount} on {invoice}"

        @server.tool(description="Report the Authorization header and the verified claims.")
        async def whoami(ctx: Context) -> dict[str, Any]:
            request = ctx.request_context.request
            scope = getattr(request, "scope", {}) or {}
            headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
            return {"authorization": headers.get("authorization"), "claims": scope.get("toolserver.claims")}

        @server.resource("invoices://latest", description="The latest invoice.")
        def latest() -> str:
            return "invoice Z9: 1.00 EUR"

        @server.prompt(description="Ask for a dunning letter.")
        def dunning(invoice: str) -> str:
            return f"Write a friendly reminder for invoice {invoice}."

        return server

    def change_description(self, text: str) -> None:
        """Change `read_invoice`'s description upstream (a "rug pull")."""
        tool = self._mcp._tool_manager.get_tool("read_invoice")
        assert tool is not None
        tool.description = text

    # -- the token check -----------------------------------------------------------------

    async def _guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body: Any = None
        with contextlib.suppress(orjson.JSONDecodeError):
            body = orjson.loads(raw) if raw else None
        seen = Seen(scope["method"], headers, body if isinstance(body, dict) else None)
        self.seen.append(seen)
        problem, claims = self._check(headers.get("authorization"), seen.body)
        if problem is not None:
            seen.status, seen.problem = 401, problem
            payload = orjson.dumps({"error": "invalid_token", "error_description": problem})
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        seen.claims = claims
        scope["toolserver.claims"] = claims
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self._app(scope, replay, send)

    def _jwks(self) -> KeySet:
        if self._keys is None:
            assert self.jwks_url is not None
            with urllib.request.urlopen(self.jwks_url, timeout=5) as answer:
                self._keys = KeySet.import_key_set(orjson.loads(answer.read()))
        return self._keys

    def _check(self, authorization: str | None, body: dict[str, Any] | None) -> tuple[str | None, Any]:
        if self.static_token is not None:
            return (None, None) if authorization == f"Bearer {self.static_token}" else ("wrong static token", None)
        if self.jwks_url is None:
            return None, None
        if not authorization or not authorization.startswith("Bearer "):
            return "no bearer token", None
        try:
            token = jwt.decode(authorization[7:], self._jwks())
        except (JoseError, ValueError) as exc:
            return f"bad token: {exc}", None
        claims = dict(token.claims)
        now = time.time()
        if claims.get("iss") != self.issuer:
            return "wrong issuer", None
        if claims.get("aud") != self.audience:
            return "wrong audience", None
        if not isinstance(claims.get("exp"), int) or claims["exp"] < now:
            return "expired", None
        if body is not None and body.get("method") == "tools/call":
            name = (body.get("params") or {}).get("name")
            if f"tool:{name}" not in str(claims.get("scope", "")).split():
                return f"token is not for tool {name}", None
        return None, claims
