"""Long-lived MCP streams (a GET's, a POST's event-stream answer such as `subscriptions/listen`) end as soon as the
caller's credential does, revoked or expired, with why on record; and a `notifications/resources/updated` on them
reaches only a caller who may read the resource it names."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from aiohttp import web

from idgate.errors import InvalidToken, ServiceUnavailable
from idgate.identity.authenticator import Authenticator
from idgate.identity.gate import Gate
from idgate.identity.principal import Caller, Credential, Principal
from idgate.mcp.gateway import LISTEN
from idgate.proxy.http import Request
from idgate.store.sqlite import SqliteStateStore
from idgate.sts.revocation import Liveness
from tests.mcp import test_list_filtering as listing
from tests.mcp.test_list_filtering import ACCEPT, ARCHIVE, LATEST, PAYROLL, MakeListGateway
from tests.support import AiohttpServer, Gateway, TestIssuer

# why: the list gateway's entities are the ones `test_list_filtering` defines: alice may read `invoices://latest`,
# bob `invoices://archive`, nobody `payroll://2024`.
make_list_gateway = listing.make_list_gateway

RESOURCE_UPDATED = "notifications/resources/updated"

NOTE = b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}'
LATER = b'{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"later"}}'


class Pushing:
    """A raw MCP upstream whose event streams (a GET's, and a `subscriptions/listen` POST's answer) send what the
    test pushes, when it pushes it (`None` ends the stream); any other POST is answered with an empty result."""

    def __init__(self) -> None:
        self.pushed: queue.Queue[bytes | None] = queue.Queue()
        self.closed = threading.Event()  # a stream's reader went away before the stream ended
        app = web.Application()
        app.router.add_route("*", "/mcp", self._handle)
        self.server = AiohttpServer(app)
        self.url = self.server.url + "/mcp"

    def push(self, *messages: bytes | None) -> None:
        for message in messages:
            self.pushed.put(None if message is None else b"event: message\ndata: " + message + b"\n\n")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            message = await request.json()
            if message.get("method") != LISTEN:
                return web.json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": {}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                try:
                    event = self.pushed.get_nowait()
                except queue.Empty:
                    if request.transport is None or request.transport.is_closing():
                        self.closed.set()
                        break
                    await asyncio.sleep(0.01)
                    continue
                if event is None:
                    break
                await response.write(event)
        except (ConnectionError, asyncio.CancelledError):
            self.closed.set()
            raise
        return response

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def pushing() -> Iterator[Pushing]:
    server = Pushing()
    yield server
    server.stop()


@pytest.fixture
def gateway(make_list_gateway: MakeListGateway, pushing: Pushing) -> Gateway:
    return make_list_gateway(pushing.url)


@contextlib.contextmanager
def opened(
    gateway: Gateway, token: str, how: str, watched: str = LATEST
) -> Iterator[tuple[httpx2.Response, Iterator[bytes]]]:
    """A stream through the gateway: the GET stream (`get`) or the answer to a `subscriptions/listen` POST that
    watches `watched` (`listen`)."""
    headers = {"Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2026-07-28"}
    request: dict[str, Any] = {"headers": {**headers, "Accept": "text/event-stream"}}
    if how == "listen":
        params = {"notifications": {"resourceSubscriptions": [watched]}}
        body = {"jsonrpc": "2.0", "id": 1, "method": LISTEN, "params": params}
        request = {"headers": {**headers, "Accept": ACCEPT}, "json": body}
    # why: a stream the gateway failed to end would hang the test; the read timeout bounds it.
    with httpx2.Client(timeout=httpx2.Timeout(5, read=3)) as http:
        method = "GET" if how == "get" else "POST"
        with http.stream(method, f"{gateway.url}/mcp/tools", **request) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield response, response.iter_bytes()


def until(chunks: Iterator[bytes], wanted: bytes) -> bytes:
    got = b""
    while wanted not in got:
        got += next(chunks)
    return got


def revoke(gateway: Gateway, token: str) -> None:
    """The gateway's own revocation endpoint (RFC 7009), as an identity provider's token is revoked there."""
    assert httpx2.post(f"{gateway.url}/oauth2/revoke", data={"token": token}, timeout=5).status_code == 200


def test_a_listen_stream_outlasts_the_servers_read_timeout(
    gateway: Gateway, issuer: TestIssuer, pushing: Pushing
) -> None:
    # why: a listen stream is quiet until a watched resource changes; the server's read timeout here is 1.5 s
    with opened(gateway, issuer.mint({"sub": "alice"}), "listen") as (_, chunks):
        time.sleep(2.0)
        pushing.push(NOTE, None)
        assert b"".join(chunks) == b"event: message\ndata: " + NOTE + b"\n\n"


# -- 1. the stream ends with the credential -----------------------------------------------------


@pytest.mark.parametrize("how", ["get", "listen"])
def test_a_revoked_token_gets_nothing_more_and_its_stream_ends(
    gateway: Gateway, issuer: TestIssuer, pushing: Pushing, how: str
) -> None:
    alice, bob = issuer.mint({"sub": "alice"}), issuer.mint({"sub": "bob"})
    with opened(gateway, alice, how) as (response, chunks):
        pushing.push(NOTE)
        assert until(chunks, b"list_changed") == b"event: message\ndata: " + NOTE + b"\n\n"
        revoke(gateway, alice)
        pushing.push(LATER)
        rest = b"".join(chunks)  # the gateway ends the stream: this returns
    if how == "get":
        assert rest == b""  # not a byte more: a GET stream answers no request of its own
    else:  # nothing of the server's more; the listen request gets an error saying why, as a broken stream's does
        assert rest.startswith(b"data: ") and rest.endswith(b"\n\n") and b"later" not in rest
        error = orjson.loads(rest[6:])
        assert error["id"] == 1 and error["error"]["code"] == -32001
        assert error["error"]["data"]["code"] == "credential_revoked"
    assert pushing.closed.wait(2)  # the upstream answer was closed, not left open
    record = gateway.record(response.headers["x-request-id"])
    assert record["status"] == 200 and record["outcome"] == "error"
    assert record["error"] == {"code": "credential_revoked", "message": "token is no longer valid: it was revoked"}
    # Another caller's stream is not touched by it.
    with opened(gateway, bob, "get") as (_, chunks):
        pushing.push(LATER, None)
        assert b"".join(chunks) == b"event: message\ndata: " + LATER + b"\n\n"


def test_an_expired_token_gets_nothing_more_and_its_stream_ends(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, pushing: Pushing
) -> None:
    # why: the stream allows the clock skew its admission did (one second here)
    gateway = make_list_gateway(pushing.url, clock_skew_seconds=1)
    # why: a whole second, as the token minted for the upstream never outlives it (and is in whole seconds); half a
    # second to a second and a half from now.
    expires = math.ceil(time.time() + 0.5)
    token = issuer.mint({"sub": "alice", "exp": expires})
    with opened(gateway, token, "get") as (response, chunks):
        pushing.push(NOTE)
        assert until(chunks, b"list_changed") == b"event: message\ndata: " + NOTE + b"\n\n"
        time.sleep(max(0.0, expires + 1 - time.time()) + 0.05)
        pushing.push(LATER)
        assert b"".join(chunks) == b""
    assert pushing.closed.wait(2)
    record = gateway.record(response.headers["x-request-id"])
    assert record["error"] == {
        "code": "credential_expired",
        "message": "the caller's credential expired while the request was under way",
    }


async def test_a_stream_asks_again_only_what_needs_no_request(tmp_path: Path) -> None:
    """What a stream asks before it relays more (`Gate.recheck`): liveness again, in memory, and nothing bound to a
    request (a binding, a DPoP proof: single-use, the stream has none to give); a revoked token is refused, and so is
    any token while liveness cannot be known (fail closed)."""
    liveness = Liveness(SqliteStateStore(tmp_path / "state.db"), poll_interval=30, max_staleness=0.1)
    asked: list[Caller] = []

    async def bound(caller: Caller, request: Request) -> None:  # as the binding and DPoP checks are
        asked.append(caller)

    gate = Gate(Authenticator([]), [bound])
    gate.add_standing_check(liveness)
    now = time.time()

    def caller(jti: str) -> Caller:
        return Caller(Principal("human", "alice", "acme", "https://id"), Credential("jwt", jti, "corp", now + 300))

    await liveness.start()
    try:
        await gate.recheck(caller("alive"))
        await liveness.revoke("token", "revoked", until=now + 60, reason="r", by="b")
        with pytest.raises(InvalidToken, match="it was revoked"):
            await gate.recheck(caller("revoked"))
        await gate.recheck(caller("alive"))
        liveness.store.close()
        liveness.store = SqliteStateStore(tmp_path / "state.db" / "inside-a-file.db")  # a store that cannot open
        await asyncio.sleep(0.2)
        with pytest.raises(ServiceUnavailable):
            await gate.recheck(caller("alive"))
        assert asked == []
    finally:
        await liveness.stop()
        liveness.store.close()


# -- 2. resource updates only for what the caller may read ----------------------------------------


def updated(uri: Any = None, **params: Any) -> bytes:
    if uri is not None:
        params["uri"] = uri
    return orjson.dumps({"jsonrpc": "2.0", "method": RESOURCE_UPDATED, "params": params})


@pytest.mark.parametrize("how", ["get", "listen"])
def test_a_resource_update_reaches_only_a_caller_who_may_read_it(
    gateway: Gateway, issuer: TestIssuer, pushing: Pushing, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    readable = updated(LATEST)
    listed = b'{"jsonrpc":"2.0","method":"notifications/resources/list_changed"}'
    pushing.push(
        updated(PAYROLL),  # nobody may read it
        readable,
        updated(ARCHIVE, title="bob's"),  # bob's, not alice's
        orjson.dumps({"jsonrpc": "2.0", "method": RESOURCE_UPDATED}),  # no params
        updated(),  # no uri
        updated(7),  # not a string
        updated(""),
        updated([LATEST]),
        listed,
        LATER,
        None,
    )
    alice = issuer.mint({"sub": "alice"})
    with caplog.at_level(logging.WARNING, logger="idgate.mcp"), opened(gateway, alice, how) as (response, chunks):
        got = b"".join(chunks)
    assert got == b"".join(b"event: message\ndata: " + m + b"\n\n" for m in (readable, listed, LATER))
    request_id = response.headers["x-request-id"]
    dropped = [r.getMessage() for r in caplog.records if RESOURCE_UPDATED in r.getMessage()]
    assert len(dropped) == 7 and all(f"MCP server tools (request {request_id})" in m for m in dropped)
    # No decision record per notification: the listen's own decision (on `invoices://latest`) is the only one.
    decisions = [r for r in gateway.raw_records() if r["request_id"] == request_id and r["kind"] == "decision"]
    assert len(decisions) == (1 if how == "listen" else 0)
    # Bob, on the same kind of stream, is told of the archive and not of the latest invoice.
    pushing.push(updated(LATEST), updated(ARCHIVE), None)
    with opened(gateway, issuer.mint({"sub": "bob"}), how, watched=ARCHIVE) as (_, chunks):
        assert b"".join(chunks) == b"event: message\ndata: " + updated(ARCHIVE) + b"\n\n"


@pytest.mark.parametrize("how", ["get", "listen"])
def test_other_messages_name_only_resources_the_caller_may_read(
    gateway: Gateway, issuer: TestIssuer, pushing: Pushing, how: str
) -> None:
    acknowledged = {
        "jsonrpc": "2.0",
        "method": "notifications/subscriptions/acknowledged",
        "params": {"notifications": {"resourceSubscriptions": [LATEST, PAYROLL, 7]}},
    }
    shouted = {"jsonrpc": "2.0", "method": "Notifications/Resources/Updated", "params": {"uri": PAYROLL}}
    pushing.push(orjson.dumps(acknowledged), orjson.dumps(shouted), None)
    with opened(gateway, issuer.mint({"sub": "alice"}), how) as (_, chunks):
        got = b"".join(chunks)
    assert PAYROLL.encode() not in got  # neither in the acknowledgement nor in another spelling of the update
    told = orjson.loads(got.split(b"data: ", 1)[1])
    assert told["params"]["notifications"]["resourceSubscriptions"] == [LATEST]
