"""An MCP tool server (official SDK) behind idgate, and official SDK clients through it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import MakeGateway
from tests.mcp.toolserver import ToolServer
from tests.support import Gateway, TestIssuer

ENTITIES = """
roles:
  - name: writers
members:
  - principal: "Agent::helper-bot"
    roles: [writers]
  - principal: "Human::bob"
    roles: [writers]
tools:
  - {server: tools, name: read_invoice, action: read}
  - {server: tools, name: refund, action: write}
  - {server: tools, name: whoami, action: read}
entitlements:
  - tenant: "*"
    tools: [tools/read_invoice, tools/whoami]
    audiences: [idgate-test]
  - role: writers
    tools: [tools/refund, "tools/*"]
"""


@pytest.fixture
def tool_server() -> Iterator[ToolServer]:
    server = ToolServer()
    yield server
    server.stop()


MakeMcpGateway = Callable[..., Gateway]


@pytest.fixture
def make_mcp_gateway(
    make_gateway: MakeGateway, issuer: TestIssuer, tool_server: ToolServer, tmp_path: Path
) -> MakeMcpGateway:
    """A gateway serving `tool_server` at /mcp/tools; the tool server checks the gateway's tokens."""

    def make(
        server: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        more_servers: tuple[dict[str, Any], ...] = (),
        sts_clients: list[dict[str, Any]] | None = None,
        **mcp: Any,
    ) -> Gateway:
        entities = tmp_path / "mcp-entities.yaml"
        entities.write_text(ENTITIES)
        config: dict[str, Any] = {
            "issuers": [{"name": "corp", "issuer": issuer.issuer, "discovery": True, "refetch_interval_seconds": 0}],
            "policy": {"entities": [str(entities)]},
            "mcp": {
                "servers": [
                    {"name": "tools", "url": tool_server.url, "timeout": {"connect": 1, "read": 1.5}, **(server or {})},
                    *more_servers,
                ],
                **mcp,
            },
        }
        if sts_clients:
            config["sts"] = {"clients": sts_clients}
        gateway = make_gateway(config, env)
        if (server or {}).get("auth", "minted") == "minted":
            tool_server.issuer = gateway.url
            tool_server.jwks_url = f"{gateway.url}/.well-known/jwks.json"
            tool_server.audience = tool_server.url
        return gateway

    return make


@pytest.fixture
def mcp_gateway(make_mcp_gateway: MakeMcpGateway) -> Gateway:
    return make_mcp_gateway()


@contextlib.asynccontextmanager
async def client(
    gateway: Gateway, token: str | None, *, server: str = "tools", mode: str = "auto", **headers: str
) -> AsyncIterator[Client]:
    """The official SDK client, through idgate, with a bearer token."""
    auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with httpx2.AsyncClient(headers={**auth, **headers}, timeout=10) as http:
        transport = streamable_http_client(f"{gateway.url}/mcp/{server}", http_client=http)
        async with Client(transport, mode=mode, cache=None) as connected:
            yield connected
