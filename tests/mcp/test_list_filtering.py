"""MCP list answers (`resources/list`, `resources/templates/list`, `prompts/list`, `tools/list`) show each caller
only what it may use, wherever they arrive: on the POST that asked, or on a GET stream (resuming one, which would
replay a POST's, is refused)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from aiohttp import web
from mcp import MCPError
from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.types import JSONRPCMessage

from tests.conftest import MakeGateway
from tests.mcp.conftest import client
from tests.mcp.toolserver import ToolServer
from tests.support import AiohttpServer, Gateway, TestIssuer

ACCEPT = "application/json, text/event-stream"
LATEST, ARCHIVE, PAYROLL = "invoices://latest", "invoices://archive", "payroll://2024"
TEMPLATE = "invoices://{invoice}"

# Alice may read the latest invoice, the invoice template and the dunning prompt; bob the archive and the apology.
# Nobody may read the payroll or get the severance prompt: those must never be listed.
ENTITIES = {
    "tools": [
        {"server": "tools", "name": "resource:invoices%3A%2F%2Flatest"},
        {"server": "tools", "name": "resource:invoices%3A%2F%2Farchive"},
        {"server": "tools", "name": "resource:invoices%3A%2F%2F%7Binvoice%7D"},
        {"server": "tools", "name": "prompt:dunning"},
        {"server": "tools", "name": "prompt:apology"},
    ],
    "entitlements": [
        {"tenant": "*", "audiences": ["idgate-test"]},
        {
            "principal": "Human::alice",
            "tools": [
                "tools/resource:invoices%3A%2F%2Flatest",
                "tools/resource:invoices%3A%2F%2F%7Binvoice%7D",
                "tools/prompt:dunning",
            ],
        },
        {"principal": "Human::bob", "tools": ["tools/resource:invoices%3A%2F%2Farchive", "tools/prompt:apology"]},
    ],
}


class CountingEvents(EventStore):
    """A resumable server's event store whose ids are a counter, as simple stores make them: a client can name an
    event of a stream it was never shown."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = str(len(self.events) + 1)
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        found = next((i for i, (event_id, _, _) in enumerate(self.events) if event_id == last_event_id), None)
        if found is None:
            return None
        stream = self.events[found][1]
        for event_id, stream_id, message in self.events[found + 1 :]:
            if stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


class ListServer(ToolServer):
    """The test tool server with more resources and prompts, and resumable streams."""

    events: CountingEvents

    def _build(self) -> MCPServer:
        server = super()._build()  # has invoices://latest and the dunning prompt

        @server.resource(ARCHIVE, description="The invoice archive.")
        def archive() -> str:
            return "all invoices"

        @server.resource(PAYROLL, description="Everyone's salary.")
        def payroll() -> str:
            return "salaries"

        @server.resource(TEMPLATE, description="One invoice.")
        def invoice(invoice: str) -> str:
            return f"invoice {invoice}"

        @server.prompt(description="Apologise for a wrong invoice.")
        def apology(invoice: str) -> str:
            return f"Apologise for invoice {invoice}."

        @server.prompt(description="Dismiss someone.")
        def severance(name: str) -> str:
            return f"Write {name}'s dismissal."

        self.events = CountingEvents()
        plain = server.streamable_http_app

        def resumable(**options: Any) -> Any:
            return plain(event_store=self.events, **options)

        server.streamable_http_app = resumable  # type: ignore[method-assign]
        return server


class Lister:
    """A raw upstream: list answers are whatever bytes the test sets per (method, cursor), `$ID` the request's id;
    a GET answers `stream`. It records every JSON-RPC message it received."""

    def __init__(self) -> None:
        self.pages: dict[tuple[str, str | None], bytes] = {}
        self.stream = b""
        self.seen: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_route("*", "/mcp", self._handle)
        self.server = AiohttpServer(app)
        self.url = self.server.url + "/mcp"

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.Response(body=self.stream, content_type="text/event-stream")
        message = await request.json()
        self.seen.append(message)
        cursor = (message.get("params") or {}).get("cursor")
        body = self.pages.get((message.get("method"), cursor))
        if body is None:
            return web.json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": {}})
        return web.Response(body=body.replace(b"$ID", orjson.dumps(message["id"])), content_type="application/json")

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def list_server() -> Iterator[ListServer]:
    server = ListServer()
    yield server
    server.stop()


@pytest.fixture
def lister() -> Iterator[Lister]:
    server = Lister()
    yield server
    server.stop()


MakeListGateway = Callable[..., Gateway]  # (url, clock_skew_seconds=None)


@pytest.fixture
def make_list_gateway(make_gateway: MakeGateway, issuer: TestIssuer, tmp_path: Path) -> MakeListGateway:
    def make(url: str, clock_skew_seconds: int | None = None) -> Gateway:
        entities = tmp_path / "list-entities.yaml"
        entities.write_bytes(orjson.dumps(ENTITIES))  # JSON is YAML
        server = {"name": "tools", "url": url, "timeout": {"connect": 1, "read": 1.5}}
        config: dict[str, Any] = {
            "issuers": [{"name": "corp", "issuer": issuer.issuer, "discovery": True, "refetch_interval_seconds": 0}],
            "policy": {"entities": [str(entities)]},
            "mcp": {"servers": [server]},
        }
        if clock_skew_seconds is not None:
            config["server"] = {"clock_skew_seconds": clock_skew_seconds}
        return make_gateway(config)

    return make


@pytest.fixture
def list_gateway(make_list_gateway: MakeListGateway, list_server: ListServer) -> Gateway:
    gateway = make_list_gateway(list_server.url)
    list_server.issuer = gateway.url
    list_server.jwks_url = f"{gateway.url}/.well-known/jwks.json"
    list_server.audience = list_server.url
    return gateway


def post(gateway: Gateway, token: str, body: dict[str, Any], session: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    if session is not None:
        headers["Mcp-Session-Id"] = session
        headers["MCP-Protocol-Version"] = "2025-11-25"
    return httpx2.post(f"{gateway.url}/mcp/tools", json=body, headers=headers, timeout=5)


# -- each caller sees only what it may read or get ------------------------------------------


async def test_resources_templates_and_prompts_are_listed_per_caller(list_gateway: Gateway, issuer: TestIssuer) -> None:
    seen: dict[str, tuple[set[str], set[str], set[str]]] = {}
    for who in ("alice", "bob"):
        async with client(list_gateway, issuer.mint({"sub": who})) as mcp:
            resources = {str(r.uri) for r in (await mcp.list_resources()).resources}
            templates = {t.uri_template for t in (await mcp.list_resource_templates()).resource_templates}
            prompts = {p.name for p in (await mcp.list_prompts()).prompts}
        seen[who] = (resources, templates, prompts)
    assert seen["alice"] == ({LATEST}, {TEMPLATE}, {"dunning"})
    assert seen["bob"] == ({ARCHIVE}, set(), {"apology"})
    # What is listed is what may be read: the listing and the call are decided alike.
    async with client(list_gateway, issuer.mint({"sub": "alice"})) as mcp:
        assert "Z9" in str((await mcp.read_resource(LATEST)).contents[0])
        with pytest.raises(MCPError):
            await mcp.read_resource(ARCHIVE)
    # One record per listing says how many entries were withheld; no decision record per entry.
    records = list_gateway.raw_records()
    listings = [r for r in records if r["kind"] == "action" and r["action"] == "list_filtered"]
    resources_listed = [r["details"] for r in listings if r["details"]["method"] == "resources/list"]
    assert {"method": "resources/list", "listed": 3, "withheld": 2} in resources_listed
    listing_requests = {r["request_id"] for r in listings}
    assert not [r for r in records if r["kind"] == "decision" and r["request_id"] in listing_requests]


# -- answers that cannot be filtered, and pages -------------------------------------------


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("resources/list", b'{"jsonrpc":"2.0","id":$ID,"result":{"resources":[{"uri":"payroll://2024"}],"x":NaN}}'),
        ("resources/list", b'{"jsonrpc":"2.0","id":$ID,"result":{"resources":{"payroll://2024":{}}}}'),
        ("resources/templates/list", b'{"jsonrpc":"2.0","id":$ID,"result":{"templates":["payroll://{y}"]}}'),
        ("prompts/list", b'{"jsonrpc":"2.0","id":99,"result":{"prompts":[{"name":"payroll"}]}}'),
        ("prompts/list", b'[{"jsonrpc":"2.0","id":$ID,"result":{"prompts":[{"name":"payroll"}]}}]'),
    ],
    ids=["nan", "not-a-list", "wrong-key", "other-id", "array"],
)
def test_a_list_answer_that_cannot_be_filtered_is_a_502(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister, method: str, body: bytes
) -> None:
    gateway = make_list_gateway(lister.url)
    lister.pages[(method, None)] = body
    listed = post(gateway, issuer.mint({"sub": "alice"}), {"jsonrpc": "2.0", "id": 1, "method": method})
    assert listed.status_code == 502 and listed.json()["error"]["code"] == -32050
    assert b"payroll" not in listed.content and listed.json()["id"] == 1


def test_pagination_cursors_pass_and_every_page_is_filtered(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister
) -> None:
    gateway = make_list_gateway(lister.url)

    def page(resources: list[str], cursor: str | None) -> bytes:
        result: dict[str, Any] = {"resources": [{"uri": uri, "name": uri} for uri in resources]}
        if cursor is not None:
            result["nextCursor"] = cursor
        return b'{"jsonrpc":"2.0","id":$ID,"result":' + orjson.dumps(result) + b"}"

    lister.pages[("resources/list", None)] = page([PAYROLL, ARCHIVE], "page-2")
    lister.pages[("resources/list", "page-2")] = page([LATEST, PAYROLL], None)
    alice = issuer.mint({"sub": "alice"})
    first = post(gateway, alice, {"jsonrpc": "2.0", "id": "a", "method": "resources/list"}).json()
    assert first == {"jsonrpc": "2.0", "id": "a", "result": {"resources": [], "nextCursor": "page-2"}}
    request = {"jsonrpc": "2.0", "id": "b", "method": "resources/list", "params": {"cursor": "page-2"}}
    second = post(gateway, alice, request).json()
    assert second["id"] == "b" and [r["uri"] for r in second["result"]["resources"]] == [LATEST]
    assert "nextCursor" not in second["result"]
    assert [(m.get("params") or {}).get("cursor") for m in lister.seen] == [None, "page-2"]


# -- a list answer replayed on a GET stream ---------------------------------------------------


def read_events(response: httpx2.Response, wanted: int) -> list[dict[str, str]]:
    """The first `wanted` events of a stream that carry a message (the stream itself may stay open)."""
    events: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if fields.get("data"):  # why: resumption cursors carry empty data
                events.append(fields)
                if len(events) == wanted:
                    break
            fields = {}
            continue
        name, _, value = line.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value
    return events


def test_resuming_a_stream_is_refused_and_nothing_is_replayed(
    list_gateway: Gateway, list_server: ListServer, issuer: TestIssuer
) -> None:
    alice = issuer.mint({"sub": "alice"})
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    opened = post(list_gateway, alice, initialize)
    session = opened.headers["mcp-session-id"]
    post(list_gateway, alice, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    listed = post(list_gateway, alice, {"jsonrpc": "2.0", "id": 5, "method": "resources/list"}, session)
    assert listed.status_code == 200 and b"payroll" not in listed.content and b"archive" not in listed.content
    # The upstream kept the answer's stream; its first event (the priming one) was never shown to alice, but
    # a counter is easy to guess. Resuming after it would replay the answer as the upstream first sent it.
    answered = next(
        stream for _, stream, message in list_server.events.events if message is not None and PAYROLL in str(message)
    )
    priming = next(event_id for event_id, stream, _ in list_server.events.events if stream == answered)
    headers = {
        "Authorization": f"Bearer {alice}",
        "Accept": "text/event-stream",
        "Mcp-Session-Id": session,
        "MCP-Protocol-Version": "2025-11-25",
        "Last-Event-ID": priming,
    }
    replayed = httpx2.get(f"{list_gateway.url}/mcp/tools", headers=headers, timeout=5)
    assert replayed.status_code == 400 and b"payroll" not in replayed.content
    error = replayed.json()["error"]
    assert error["code"] == -32600 and "event ids are not bound to their caller" in error["message"]
    assert [seen.method for seen in list_server.seen if seen.method != "POST"] == []


def test_the_get_stream_is_written_anew(make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister) -> None:
    gateway = make_list_gateway(lister.url)
    # A list request goes upstream under an id of the gateway's own; a stream replaying its answer names it.
    post(gateway, issuer.mint({"sub": "alice"}), {"jsonrpc": "2.0", "id": 3, "method": "prompts/list"})
    upstream_id = orjson.dumps(lister.seen[-1]["id"])
    assert lister.seen[-1]["id"] != 3
    lister.stream = b"\r\n".join(
        [
            b"id: 1",
            b"data:",  # a resumption cursor: passes without content
            b"",
            b": keep-alive",
            b"",
            b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}',
            b"",
            b"data: not json, not relayed",
            b"",
            b'id: 2\r\ndata: {"jsonrpc":"2.0","id":' + upstream_id + b',"result":{"prompts":{"severance":{}}}}',
            b"",
            b'id: 3\r\ndata: {"jsonrpc":"2.0","id":' + upstream_id + b',"result":{"prompts":'
            b'[{"name":"dunning"},{"name":"severance"},{"name":"apology"}]}}',
            b"",
            # an answer to a request that was no list: a GET's stream answers none (resumption is refused), and
            # under the caller's id it would stand in for that request's answer
            b'data: {"jsonrpc":"2.0","id":9,"result":{"content":[]}}',
            b"",
            b"",
        ]
    )
    headers = {"Authorization": f"Bearer {issuer.mint({'sub': 'alice'})}", "Accept": "text/event-stream"}
    got = httpx2.get(f"{gateway.url}/mcp/tools", headers=headers, timeout=5)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/event-stream")
    assert b"\r" not in got.content and b"not json" not in got.content and b"severance" not in got.content
    events = got.content.split(b"\n\n")[:-1]
    assert events[:2] == [b"id: 1\ndata:", b":"]
    assert orjson.loads(events[2].split(b"data: ")[1])["method"] == "notifications/tools/list_changed"
    broken = orjson.loads(events[3].split(b"data: ")[1])
    assert events[3].startswith(b"id: 2\n") and broken["id"] == 3 and broken["error"]["code"] == -32050
    filtered = orjson.loads(events[4].split(b"data: ")[1])
    assert filtered == {"jsonrpc": "2.0", "id": 3, "result": {"prompts": [{"name": "dunning"}]}}
    assert len(events) == 5  # the other answer dropped
