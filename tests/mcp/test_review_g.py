"""Three MCP fixes from a review: stream resumption is refused (event ids are not bound to their caller), JSON nested
deeper than the gateway can write again is refused or dropped instead of failing, and a caller may not use an id in
the form the gateway tags its own list requests with."""

from __future__ import annotations

import logging
from typing import Any

import httpx2
import pytest

from tests.mcp import test_list_filtering as listing
from tests.mcp.test_list_filtering import ACCEPT, LATEST, Lister, ListServer, MakeListGateway, post
from tests.support import Gateway, TestIssuer

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
# why: the list fixtures (servers, gateways) are the ones `test_list_filtering` defines, shared as they are.
list_server, lister, make_list_gateway, list_gateway = (
    listing.list_server,
    listing.lister,
    listing.make_list_gateway,
    listing.list_gateway,
)
DEEP = b"[" * 1010 + b"]" * 1010  # orjson reads it (up to 1024 levels); neither it nor Python's `json` writes it
DEEPISH = b"[" * 300 + b"]" * 300  # orjson reads it but writes 254 levels at most: Python's `json` writes it


def open_session(gateway: Gateway, token: str) -> str:
    session = post(gateway, token, INITIALIZE).headers["mcp-session-id"]
    post(gateway, token, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    return session


def raw_post(gateway: Gateway, token: str, body: bytes, **headers: str) -> httpx2.Response:
    sent = {"Authorization": f"Bearer {token}", "Accept": ACCEPT, "Content-Type": "application/json", **headers}
    return httpx2.post(f"{gateway.url}/mcp/tools", content=body, headers=sent, timeout=5)


def refused_record(gateway: Gateway, request_id: str) -> dict[str, Any]:
    return next(r for r in gateway.raw_records() if r.get("request_id") == request_id and r.get("status") == 400)


# -- 1. Last-Event-ID ---------------------------------------------------------------------------


def test_another_callers_event_id_replays_nothing(
    list_gateway: Gateway, list_server: ListServer, issuer: TestIssuer
) -> None:
    alice, bob = issuer.mint({"sub": "alice"}), issuer.mint({"sub": "bob"})
    alices, bobs = open_session(list_gateway, alice), open_session(list_gateway, bob)
    read = {"jsonrpc": "2.0", "id": 7, "method": "resources/read", "params": {"uri": LATEST}}
    assert post(list_gateway, bob, {**read, "id": 2}, bobs).status_code == 403  # bob may not read it himself
    assert b"Z9" in post(list_gateway, alice, read, alices).content
    stream = next(s for _, s, m in list_server.events.events if m is not None and "Z9" in str(m))
    priming = next(event_id for event_id, s, _ in list_server.events.events if s == stream)
    headers = {
        "Authorization": f"Bearer {bob}",
        "Accept": "text/event-stream",
        "Mcp-Session-Id": bobs,
        "MCP-Protocol-Version": "2025-11-25",
        "Last-Event-ID": priming,
    }
    replayed = httpx2.get(f"{list_gateway.url}/mcp/tools", headers=headers, timeout=5)
    assert replayed.status_code == 400 and b"Z9" not in replayed.content
    error = replayed.json()["error"]
    assert error["code"] == -32600
    assert error["message"] == (
        "resuming a stream is not supported through the gateway: event ids are not bound to their caller"
    )
    assert [seen.method for seen in list_server.seen if seen.method != "POST"] == []  # nothing went upstream
    record = refused_record(list_gateway, replayed.headers["x-request-id"])
    assert record["error"]["code"] == "resumption_not_supported"


def test_a_post_with_last_event_id_is_refused(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister
) -> None:
    gateway = make_list_gateway(lister.url)
    token = issuer.mint({"sub": "alice"})
    refused = raw_post(gateway, token, b'{"jsonrpc":"2.0","id":4,"method":"ping"}', **{"Last-Event-ID": "1"})
    assert refused.status_code == 400 and refused.json()["id"] == 4
    assert refused.json()["error"]["code"] == -32600 and lister.seen == []
    # and without it, the same message goes through
    assert raw_post(gateway, token, b'{"jsonrpc":"2.0","id":4,"method":"ping"}').status_code == 200


# -- 2. nesting ---------------------------------------------------------------------------------


def nested(levels: int) -> bytes:
    """A `ping` whose message is `levels` deep in all (the message object is level 1)."""
    inner = b"[" * (levels - 1) + b"]" * (levels - 1)
    return b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":' + inner[1:-1] + b"}}"


def test_a_callers_message_nested_too_deep_is_refused(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister
) -> None:
    gateway = make_list_gateway(lister.url)
    token = issuer.mint({"sub": "alice"})
    for body in (
        b'{"jsonrpc":"2.0","id":' + DEEP + b',"method":"prompts/list"}',
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":' + DEEP + b"}}",
        nested(65),
    ):
        refused = raw_post(gateway, token, body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == -32600 and "nested deeper than 64" in refused.text
    assert lister.seen == []
    assert raw_post(gateway, token, nested(64)).status_code == 200 and len(lister.seen) == 1


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("prompts/list", b'{"jsonrpc":"2.0","id":$ID,"result":{"prompts":[{"name":"dunning","_meta":' + DEEP + b"}]}}"),
        ("tools/list", b'{"jsonrpc":"2.0","id":$ID,"result":{"tools":[{"name":"t","inputSchema":' + DEEP + b"}]}}"),
    ],
)
def test_an_upstream_list_answer_too_deep_to_write_is_a_502(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister, method: str, answer: bytes
) -> None:
    gateway = make_list_gateway(lister.url)
    lister.pages[(method, None)] = answer
    listed = post(gateway, issuer.mint({"sub": "alice"}), {"jsonrpc": "2.0", "id": 1, "method": method})
    assert listed.status_code == 502 and listed.json()["id"] == 1
    assert listed.json()["error"]["code"] == -32050


def test_a_get_event_too_deep_to_write_is_dropped_and_the_stream_goes_on(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = make_list_gateway(lister.url)
    lister.stream = (
        b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{"data":' + DEEP + b"}}\n\n"
        b'data: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n'
    )
    headers = {"Authorization": f"Bearer {issuer.mint({'sub': 'alice'})}", "Accept": "text/event-stream"}
    with caplog.at_level(logging.WARNING, logger="idgate.mcp"):
        got = httpx2.get(f"{gateway.url}/mcp/tools", headers=headers, timeout=5)
    assert got.status_code == 200
    assert got.content == b'data: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n'
    assert "cannot be written" in caplog.text


def test_a_get_event_deeper_than_orjson_writes_is_written_by_json(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister
) -> None:
    gateway = make_list_gateway(lister.url)
    lister.stream = b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{"data":' + DEEPISH + b"}}\n\n"
    headers = {"Authorization": f"Bearer {issuer.mint({'sub': 'alice'})}", "Accept": "text/event-stream"}
    got = httpx2.get(f"{gateway.url}/mcp/tools", headers=headers, timeout=5)
    assert got.status_code == 200
    assert (
        got.content
        == b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{"data":' + DEEPISH + b"}}\n\n"
    )


# -- 3. the gateway's own list tag --------------------------------------------------------------


@pytest.mark.parametrize("method", ["ping", "tools/list"])
def test_a_caller_id_in_the_gateways_list_form_is_refused(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister, method: str
) -> None:
    gateway = make_list_gateway(lister.url)
    forged = {"jsonrpc": "2.0", "id": "idgate-list:tools/list:1", "method": method}
    refused = post(gateway, issuer.mint({"sub": "alice"}), forged)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == -32600
    assert "idgate-list:" in refused.json()["error"]["message"] and lister.seen == []
