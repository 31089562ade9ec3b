"""The MCP routing headers (`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`, MCP 2026-07-28) reach the tool server only as
copies of the body: a server, or a load balancer in front of it, that routes on them must never act on a call the
gateway did not decide. Each contradiction is refused before anything goes upstream; the SDK's own headers pass."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import httpx2
import pytest
from mcp.server.mcpserver import MCPServer
from pydantic import Field

from tests.mcp.conftest import MakeMcpGateway, client
from tests.mcp.toolserver import ToolServer
from tests.support import Gateway, TestIssuer

ACCEPT = "application/json, text/event-stream"
HEADER_MISMATCH = -32020


class HeaderToolServer(ToolServer):
    """The test tool server with one more tool, `ship`, whose arguments are mirrored into `Mcp-Param-*` headers."""

    def _build(self) -> MCPServer:
        server = super()._build()

        @server.tool(description="Ship a parcel.")
        async def ship(
            region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})],
            count: Annotated[int, Field(json_schema_extra={"x-mcp-header": "Count"})],
            express: Annotated[bool, Field(json_schema_extra={"x-mcp-header": "Express"})],
        ) -> str:
            return f"shipped {count} to {region}{' express' if express else ''}"

        return server


@pytest.fixture
def tool_server() -> Iterator[ToolServer]:
    server = HeaderToolServer()
    yield server
    server.stop()


@pytest.fixture
def gateway(make_mcp_gateway: MakeMcpGateway) -> Gateway:
    return make_mcp_gateway(server={"tools": {"ship": "write"}})  # bob, a writer, holds `tools/*`


def post(gateway: Gateway, token: str, body: Any, headers: list[tuple[str, str]]) -> httpx2.Response:
    sent = [("Authorization", f"Bearer {token}"), ("Accept", ACCEPT), ("Content-Type", "application/json"), *headers]
    return httpx2.post(f"{gateway.url}/mcp/tools", json=body, headers=sent, timeout=5)


def request(method: str, params: dict[str, Any] | None = None, rpc_id: int | None = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rpc_id is not None:
        message["id"] = rpc_id
    if params is not None:
        message["params"] = params
    return message


INITIALIZE = request(
    "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}
)
READ_T1 = request("tools/call", {"name": "read_invoice", "arguments": {"invoice": "T1"}})
SHIP = request("tools/call", {"name": "ship", "arguments": {"region": "eu-1", "count": 3, "express": True}})

CONTRADICTIONS: dict[str, tuple[dict[str, Any], list[tuple[str, str]]]] = {
    # The reviewer's case: the body says initialize, the headers a refund.
    "initialize-as-tools/call": (INITIALIZE, [("Mcp-Method", "tools/call"), ("Mcp-Name", "refund")]),
    "tools/list-as-tools/call": (request("tools/list"), [("Mcp-Method", "tools/call")]),
    "ping-as-tools/call": (request("ping"), [("Mcp-Method", "tools/call")]),
    "notification-as-tools/call": (request("notifications/initialized", rpc_id=None), [("Mcp-Method", "tools/call")]),
    "answer-as-tools/call": ({"jsonrpc": "2.0", "id": 1, "result": {}}, [("Mcp-Method", "tools/call")]),
    "name-on-tools/list": (request("tools/list"), [("Mcp-Method", "tools/list"), ("Mcp-Name", "refund")]),
    "name-on-initialize": (INITIALIZE, [("Mcp-Name", "refund")]),
    "param-on-initialize": (INITIALIZE, [("Mcp-Param-Amount", "1000000")]),
    "param-on-tools/list": (request("tools/list"), [("Mcp-Method", "tools/list"), ("Mcp-Param-Invoice", "T1")]),
    "param-of-another-value": (READ_T1, [("Mcp-Param-Invoice", "T999-other")]),
    "param-of-no-argument": (READ_T1, [("Mcp-Param-Amount", "1000000")]),
    "param-in-non-canonical-base64": (READ_T1, [("Mcp-Param-Invoice", "=?base64?VDF=?=")]),  # canonical: VDE=
    "param-of-a-number-argument": (
        request("tools/call", {"name": "read_invoice", "arguments": {"invoice": 1.5}}),
        [("Mcp-Param-Invoice", "1.5")],
    ),
    "param-sent-twice": (READ_T1, [("Mcp-Param-Invoice", "T1"), ("Mcp-Param-Invoice", "T999-other")]),
    "method-sent-twice": (READ_T1, [("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/list")]),
    "name-on-subscribe-of-another-uri": (
        request("resources/subscribe", {"uri": "invoices://latest"}),
        [("Mcp-Method", "resources/subscribe"), ("Mcp-Name", "invoices://all")],
    ),
}


@pytest.mark.parametrize(("body", "headers"), CONTRADICTIONS.values(), ids=CONTRADICTIONS.keys())
def test_routing_headers_that_contradict_the_body_are_refused_before_the_upstream(
    gateway: Gateway,
    issuer: TestIssuer,
    tool_server: ToolServer,
    body: dict[str, Any],
    headers: list[tuple[str, str]],
) -> None:
    answer = post(gateway, issuer.mint({"sub": "alice"}), body, headers)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == HEADER_MISMATCH and error["data"]["code"] == "header_mismatch"
    assert "Mcp-" in error["message"] and answer.json()["id"] == body.get("id")
    assert tool_server.seen == []
    # The refusal is on record like any other.
    records = [r for r in gateway.raw_records() if r["request_id"] == error["data"]["request_id"]]
    assert records and "header_mismatch" in str(records)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize(
    "header", [("Mcp-Method", "tools/call"), ("Mcp-Name", "refund"), ("Mcp-Param-Amount", "1000000")]
)
def test_routing_headers_on_a_get_or_delete_are_refused(
    gateway: Gateway, issuer: TestIssuer, tool_server: ToolServer, method: str, header: tuple[str, str]
) -> None:
    headers = [("Authorization", f"Bearer {issuer.mint({'sub': 'alice'})}"), ("Accept", "text/event-stream"), header]
    answer = httpx2.request(method, f"{gateway.url}/mcp/tools", headers=headers, timeout=5)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == HEADER_MISMATCH
    assert tool_server.seen == []


async def test_the_sdks_mirrored_headers_pass_and_a_forged_one_does_not(
    gateway: Gateway, issuer: TestIssuer, tool_server: ToolServer
) -> None:
    bob = issuer.mint({"sub": "bob"})
    async with client(gateway, bob) as mcp:
        await mcp.list_tools()  # the SDK learns `ship`'s `x-mcp-header` annotations
        plain = await mcp.call_tool("ship", {"region": "eu-1", "count": 3, "express": True})
        encoded = await mcp.call_tool("ship", {"region": "Zürich", "count": -2, "express": False})
    assert [getattr(c, "text", "") for c in (*plain.content, *encoded.content)] == [
        "shipped 3 to eu-1 express",
        "shipped -2 to Zürich",
    ]
    first, second = tool_server.calls("ship")
    # The tool server (the SDK's, which checks them against the schema too) got the headers as the client sent them.
    assert (first.headers["mcp-method"], first.headers["mcp-name"]) == ("tools/call", "ship")
    assert [first.headers[f"mcp-param-{h}"] for h in ("region", "count", "express")] == ["eu-1", "3", "true"]
    assert second.headers["mcp-param-region"] == "=?base64?WsO8cmljaA==?="
    assert [second.headers[f"mcp-param-{h}"] for h in ("count", "express")] == ["-2", "false"]
    assert first.status == second.status == 0
    # The same call with one header forged goes nowhere.
    forged = [("Mcp-Method", "tools/call"), ("Mcp-Name", "ship"), ("Mcp-Param-Region", "us-1")]
    answer = post(gateway, bob, SHIP, [*forged, ("Mcp-Param-Count", "3"), ("Mcp-Param-Express", "true")])
    assert answer.status_code == 400 and "Mcp-Param-Region" in answer.json()["error"]["message"]
    assert len(tool_server.calls("ship")) == 2


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (request("tools/list"), [("Mcp-Method", "tools/list")]),
        (READ_T1, [("Mcp-Method", "tools/call"), ("Mcp-Name", "read_invoice"), ("mcp-param-INVOICE", "T1")]),
        (READ_T1, [("Mcp-Param-Invoice", "=?base64?VDE=?=")]),
    ],
    ids=["method", "name-and-param", "param-in-base64"],
)
def test_matching_routing_headers_are_relayed_and_contradicting_ones_are_not(
    gateway: Gateway,
    issuer: TestIssuer,
    tool_server: ToolServer,
    body: dict[str, Any],
    headers: list[tuple[str, str]],
) -> None:
    token = issuer.mint({"sub": "alice"})
    post(gateway, token, body, headers)  # whatever the tool server makes of a call out of a session
    (seen,) = tool_server.seen
    assert {k: v for k, v in seen.headers.items() if k.startswith("mcp-")} == {k.lower(): v for k, v in headers}
    # The same headers on another method go nowhere.
    assert post(gateway, token, request("ping"), headers).status_code == 400
    assert len(tool_server.seen) == 1
