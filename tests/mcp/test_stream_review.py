"""What a review of the stream re-checks found (each proven by a script first): the paths that still gave a caller
bytes after its credential lapsed, or a resource's name it may not read.

- a list answer sent as an event stream carried the server's `notifications/resources/updated` unchecked;
- a JSON answer that came after the revocation (a slow tool) went out whole;
- a quiet stream of a revoked caller stayed open (and its upstream subscription with it);
- a `subscriptions/listen` answered in JSON, or whose server never sent headers, had no time limit at all.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import orjson
import pytest
from aiohttp import web

from idgate.mcp.gateway import LISTEN, _read_json, _write_json
from tests.mcp import test_list_filtering as listing
from tests.mcp.test_list_filtering import LATEST, PAYROLL, MakeListGateway, post
from tests.mcp.test_stream_credentials import opened, revoke
from tests.support import AiohttpServer, Gateway, TestIssuer

make_list_gateway = listing.make_list_gateway  # alice may read `invoices://latest`, nobody `payroll://2024`;
# its server's `timeout.read` is 1.5 s

SECRET = "SECRET-CONTENTS-OF-THE-INVOICE"


def updated(uri: str) -> bytes:
    note = {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": uri}}
    return b"event: message\ndata: " + orjson.dumps(note) + b"\n\n"


class Upstream:
    """A raw MCP server; `mode` says how it answers: `sse-list` (a resources/list answer as an event stream, with
    resource updates before it), `slow-json` (a second's thought, then an answer holding a secret), `quiet` (an
    event stream that sends nothing), `trickle` (a JSON answer a byte at a time), `mute` (no headers at all)."""

    def __init__(self) -> None:
        self.mode = "quiet"
        self.closed = asyncio.Event()
        self.gone = False  # a stream's reader went away
        app = web.Application()
        app.router.add_route("*", "/mcp", self._handle)
        self.server = AiohttpServer(app)
        self.url = self.server.url + "/mcp"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        message: dict[str, Any] = await request.json() if request.method == "POST" else {}
        if self.mode == "sse-list":
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"resources": []}}
            body = updated(PAYROLL) + updated(LATEST) + b"event: message\ndata: " + orjson.dumps(answer) + b"\n\n"
            return web.Response(body=body, content_type="text/event-stream")
        if self.mode == "lenient":  # what Python's `json.dumps` and JavaScript's `JSON.stringify` may write
            data = b'{"jsonrpc":"2.0","id":%s,"result":{"v":NaN,"text":"cut \\ud83d"}}' % orjson.dumps(message["id"])
            return web.Response(body=b"event: message\ndata: " + data + b"\n\n", content_type="text/event-stream")
        if self.mode == "json-notification":  # a notification as the whole answer to a POST
            note = {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": PAYROLL}}
            return web.json_response(note)
        if self.mode == "other-id-json":  # the answer under another request's id: a pending list's, say
            listed = {"resources": [{"uri": PAYROLL, "name": "payroll"}]}
            return web.json_response({"jsonrpc": "2.0", "id": 41, "result": listed})
        if self.mode == "other-id-sse":
            listed = {"resources": [{"uri": PAYROLL, "name": "payroll"}]}
            other = b"data: " + orjson.dumps({"jsonrpc": "2.0", "id": 41, "result": listed}) + b"\n\n"
            own = b"data: " + orjson.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {}}) + b"\n\n"
            return web.Response(body=other + own, content_type="text/event-stream")
        if self.mode == "accepted":  # what Express's `res.sendStatus(202)` sends for a notification
            return web.Response(status=202, text="Accepted")
        if self.mode == "late-body":  # headers at once, the answer a second later
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await asyncio.sleep(1.0)
            result = {"content": [{"type": "text", "text": SECRET}]}
            await response.write(orjson.dumps({"jsonrpc": "2.0", "id": message.get("id"), "result": result}))
            return response
        if self.mode == "slow-json":
            await asyncio.sleep(1.0)
            result = {"content": [{"type": "text", "text": SECRET}]}
            return web.json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": result})
        if self.mode == "mute":
            await asyncio.sleep(20)
        content_type = "application/json" if self.mode == "trickle" else "text/event-stream"
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        if self.mode == "stall":  # one event, then nothing for longer than the gateway's read timeout
            await response.write(b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n')
        try:
            for _ in range(100):  # 20 s at most, so that a test that fails still ends
                if self.mode == "trickle":
                    await response.write(b" ")
                await asyncio.sleep(0.2)
                if request.transport is None or request.transport.is_closing():
                    self.gone = True
                    break
        except (ConnectionError, asyncio.CancelledError):
            self.gone = True
        return response


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.server.stop()


@pytest.fixture
def gateway(make_list_gateway: MakeListGateway, upstream: Upstream) -> Gateway:
    return make_list_gateway(upstream.url)


def test_a_list_answer_as_an_event_stream_carries_no_update_the_caller_may_not_read(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    upstream.mode = "sse-list"
    listed = post(gateway, issuer.mint({"sub": "alice"}), {"jsonrpc": "2.0", "id": 1, "method": "resources/list"})
    assert listed.status_code == 200
    assert PAYROLL.encode() not in listed.content  # its update dropped
    assert LATEST.encode() in listed.content  # hers passes
    assert b'"result"' in listed.content


@pytest.mark.parametrize("method", ["ping", "resources/list"])  # an answer relayed, or read whole to filter it
@pytest.mark.parametrize("mode", ["slow-json", "late-body"])  # the revocation before the headers, or after
def test_an_answer_that_comes_after_the_revocation_is_not_given(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, mode: str, method: str
) -> None:
    upstream.mode = mode
    alice = issuer.mint({"sub": "alice"})
    call = {"jsonrpc": "2.0", "id": 5, "method": method}
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(post, gateway, alice, call)
        time.sleep(0.3)
        revoke(gateway, alice)
        answer = asked.result(timeout=10)
    assert SECRET.encode() not in answer.content
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert error["code"] == -32001 and error["data"]["code"] == "credential_revoked" and answer.json()["id"] == 5
    assert answer.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("how", ["get", "listen"])
def test_a_quiet_stream_of_a_revoked_caller_ends(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, how: str
) -> None:
    alice = issuer.mint({"sub": "alice"})
    with opened(gateway, alice, how) as (response, chunks):
        revoke(gateway, alice)
        started = time.monotonic()
        rest = b"".join(chunks)  # the gateway ends the stream within about a second, with no event from upstream
        assert time.monotonic() - started < 2.5
    assert b"credential_revoked" in rest if how == "listen" else rest == b""
    deadline = time.monotonic() + 2
    while not upstream.gone and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.gone  # the upstream stream (and its subscription) was closed too
    assert gateway.record(response.headers["x-request-id"])["error"]["code"] == "credential_revoked"


def listen(gateway: Gateway, token: str) -> httpx2.Response:
    body = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": LISTEN,
        "params": {"notifications": {"resourceSubscriptions": [LATEST]}},
    }
    headers = {"Authorization": f"Bearer {token}", "Accept": listing.ACCEPT, "MCP-Protocol-Version": "2026-07-28"}
    return httpx2.post(f"{gateway.url}/mcp/tools", json=body, headers=headers, timeout=8)


@pytest.mark.parametrize("mode", ["trickle", "mute"])
def test_a_listen_answered_in_json_or_not_at_all_is_bounded(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, mode: str
) -> None:
    upstream.mode = mode
    started = time.monotonic()
    answer = listen(gateway, issuer.mint({"sub": "alice"}))
    assert time.monotonic() - started < 4  # the server's read timeout (1.5 s), not forever
    error = answer.json()["error"]
    assert error["data"]["code"] == "upstream_timeout" and answer.json()["id"] == 9


def test_an_answer_orjson_cannot_read_still_reaches_the_caller(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    upstream.mode = "lenient"  # NaN and a lone surrogate: orjson refuses both; Python's `json` reads and writes them
    answer = listen(gateway, issuer.mint({"sub": "alice"}))
    assert answer.status_code == 200
    event = answer.content.decode()
    assert event.startswith("event: message\ndata: ")
    message = json.loads(event.split("data: ", 1)[1])
    assert message["id"] == 9 and math.isnan(message["result"]["v"]) and message["result"]["text"] == "cut \ud83d"


def test_a_json_answer_that_is_a_notification_is_checked_too(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    upstream.mode = "json-notification"
    answer = post(gateway, issuer.mint({"sub": "alice"}), {"jsonrpc": "2.0", "id": 3, "method": "ping"})
    assert PAYROLL.encode() not in answer.content
    error = answer.json()["error"]
    assert answer.json()["id"] == 3 and error["data"]["code"] == "upstream_error"
    assert "may not have" in error["message"]


def test_a_post_stream_quiet_past_the_read_timeout_ends_as_broken_off(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    upstream.mode = "stall"  # a tool that works longer than `timeout.read` (1.5 s) without a word
    started = time.monotonic()
    answer = post(gateway, issuer.mint({"sub": "alice"}), {"jsonrpc": "2.0", "id": 7, "method": "ping"})
    assert time.monotonic() - started < 4  # not spinning until the client gives up
    last = orjson.loads(answer.content.rstrip().rsplit(b"data: ", 1)[1])
    assert last["id"] == 7 and last["error"]["data"]["code"] == "upstream_error"
    assert "broke off" in last["error"]["message"]


@pytest.mark.parametrize("mode", ["other-id-json", "other-id-sse"])
def test_an_answer_under_another_requests_id_is_not_relayed(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, mode: str
) -> None:
    upstream.mode = mode
    answer = post(gateway, issuer.mint({"sub": "alice"}), {"jsonrpc": "2.0", "id": 3, "method": "ping"})
    assert PAYROLL.encode() not in answer.content and b'"id":41' not in answer.content
    if mode == "other-id-json":
        error = answer.json()["error"]
        assert answer.json()["id"] == 3 and "another request" in error["message"]
    else:  # its own answer still comes
        assert orjson.loads(answer.content.split(b"data: ", 1)[1]) == {"jsonrpc": "2.0", "id": 3, "result": {}}


def test_an_acceptance_of_a_notification_passes_as_it_came(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    upstream.mode = "accepted"
    answer = post(gateway, issuer.mint({"sub": "alice"}), {"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert answer.status_code == 202 and answer.content == b"Accepted"
    assert gateway.record(answer.headers["x-request-id"])["outcome"] == "ok"


@pytest.mark.parametrize(
    ("data", "written"),
    [
        (b'{"a":NaN}', b'{"a":NaN}'),  # as Python's json writes it: read and written back as it came
        (b'{"a":"cut \\ud83d"}', b'{"a":"cut \\ud83d"}'),  # a lone surrogate, as JavaScript escapes it
        (b'{"a":1e400}', None),  # read as inf it would be written `Infinity`, which no JSON parser reads: refused
    ],
)
def test_what_orjson_refuses_is_read_and_written_back_as_it_came_or_refused(data: bytes, written: bytes | None) -> None:
    if written is None:
        with pytest.raises(ValueError):
            _read_json(data)
        return
    message, strict = _read_json(data)
    assert not strict and _write_json(message, strict) == written
