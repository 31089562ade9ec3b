"""When the upstream fails: what the caller gets, how soon, what is recorded, and that nothing leaks.

The provider here has one pooled connection (`max_connections: 1`), so a
connection left acquired or poisoned by a failure would make the next normal
request hang or fail: every test ends by serving one normally.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from idgate.providers.openai import OpenAIProvider
from tests.conftest import UPSTREAM_KEY, MakeGateway, base_config
from tests.support import Gateway, TestIssuer, Upstream, free_port, raw_request, upstream_error_body, wait_for

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gateway(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream) -> Gateway:
    config = base_config(issuer, upstream)
    config["providers"][0]["max_connections"] = 1
    return make_gateway(config)


def sdk(gateway: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=10)


def acquired(gateway: Gateway) -> int:
    """Connections the provider's pool has handed out and not taken back."""
    provider = gateway.app.providers["up"]
    assert isinstance(provider, OpenAIProvider) and provider._session is not None
    connector = provider._session.connector
    assert isinstance(connector, aiohttp.TCPConnector)
    return len(connector._acquired)


def post(gateway: Gateway, token: str, body: dict[str, Any]) -> tuple[Any, float]:
    """A raw chat call: the response and how long it took."""
    started = time.monotonic()
    response = raw_request(
        gateway.url,
        "POST",
        "/v1/chat/completions",
        orjson.dumps(body),
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    return response, time.monotonic() - started


def record_of(gateway: Gateway, request_id: str | None) -> dict[str, Any]:
    assert request_id is not None and request_id.startswith("req_")
    return gateway.record(request_id)


def sse_events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event.strip()]


def assert_still_serves(gateway: Gateway, issuer: TestIssuer, upstream: Upstream) -> None:
    """The pool is clean: a normal call and a normal stream go through the one connection."""
    wait_for(lambda: acquired(gateway) == 0)
    upstream.mode = "ok"
    with sdk(gateway, issuer.mint()) as client:
        reply = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "again"}])
        assert reply.choices[0].message.content == "upstream says hi"
        with client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "again"}], stream=True
        ) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "the upstream says hello"
    wait_for(lambda: acquired(gateway) == 0)


def assert_no_secret_in(gateway: Gateway, token: str) -> None:
    trail = orjson.dumps(gateway.records()).decode()
    assert token not in trail and UPSTREAM_KEY not in trail


# -- before the first byte: a JSON error in OpenAI's shape ----------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_connection_refused_is_502(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, stream: bool
) -> None:
    config = base_config(issuer, upstream)
    config["providers"][0]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens there
    gateway = make_gateway(config)
    token = issuer.mint()

    with sdk(gateway, token) as client, pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=stream)
    assert failed.value.status_code == 502
    error = failed.value.body
    assert isinstance(error, dict)
    assert error["code"] == "upstream_error" and error["type"] == "upstream_error"
    assert "cannot be reached" in error["message"] and "127.0.0.1" not in error["message"]
    assert error["request_id"] == failed.value.request_id

    response, elapsed = post(gateway, token, {**CHAT, "stream": stream})
    assert response.status == 502 and elapsed < 5
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error"}
    assert {"message", "type", "code"} <= set(response.json()["error"])

    record = record_of(gateway, failed.value.request_id)
    assert record["status"] == 502 and record["outcome"] == "error"
    assert record["error"]["code"] == "upstream_error" and record["decision"]["allowed"] is True
    assert record["stream"] is stream
    wait_for(lambda: acquired(gateway) == 0)
    assert_no_secret_in(gateway, token)


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_slower_than_read_timeout_is_504_in_bounded_time(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, stream: bool
) -> None:
    upstream.mode, upstream.delay = "slow", 5.0  # the read timeout is 1.5 s
    started = time.monotonic()
    with sdk(gateway, issuer.mint()) as client, pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=stream)
    elapsed = time.monotonic() - started
    assert failed.value.status_code == 504
    assert 1.4 < elapsed < 4.5
    error = failed.value.body
    assert isinstance(error, dict) and error["code"] == "upstream_timeout"
    assert error["message"] == "upstream `up` did not answer in time"

    record = record_of(gateway, failed.value.request_id)
    assert record["status"] == 504 and record["outcome"] == "error" and record["error"]["code"] == "upstream_timeout"
    assert_still_serves(gateway, issuer, upstream)


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_500_is_502_without_its_body(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, stream: bool
) -> None:
    upstream.mode = "error500"
    token = issuer.mint()
    response, _ = post(gateway, token, {**CHAT, "stream": stream})
    assert response.status == 502
    assert b"boom" not in response.body  # the upstream's own words stay upstream
    error = response.json()["error"]
    assert error["code"] == "upstream_error" and error["message"] == "upstream `up` failed with status 500"

    record = record_of(gateway, response.headers["x-request-id"])
    assert record["status"] == 502 and record["outcome"] == "error"
    assert "boom" not in orjson.dumps(record).decode()
    assert len(upstream.received) == 1
    assert_still_serves(gateway, issuer, upstream)
    assert_no_secret_in(gateway, token)


def test_upstream_refusing_our_own_key_is_502_not_the_callers_401(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    upstream.mode = "error401"
    with sdk(gateway, issuer.mint()) as client, pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert failed.value.status_code == 502
    assert "upstream_code_401" not in str(failed.value.body)
    assert record_of(gateway, failed.value.request_id)["outcome"] == "error"
    assert_still_serves(gateway, issuer, upstream)


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(400, openai.BadRequestError), (422, openai.UnprocessableEntityError), (429, openai.RateLimitError)],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_4xx_is_relayed_with_its_status_and_body(
    gateway: Gateway,
    issuer: TestIssuer,
    upstream: Upstream,
    status: int,
    error_class: type[openai.APIStatusError],
    stream: bool,
) -> None:
    upstream.mode = f"error{status}"
    with sdk(gateway, issuer.mint()) as client, pytest.raises(error_class) as failed:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=stream)
    assert failed.value.status_code == status
    assert failed.value.body == upstream_error_body(status)["error"]

    response, _ = post(gateway, issuer.mint(), {**CHAT, "stream": stream})
    assert response.status == status
    assert response.json() == upstream_error_body(status)
    assert response.headers["content-type"] == "application/json"
    if status == 429:
        assert response.headers["retry-after"] == "7"  # the caller's SDK backs off as the upstream asked

    record = record_of(gateway, response.headers["x-request-id"])
    assert record["status"] == status and record["outcome"] == "refused"
    assert record["error"]["code"] == "upstream_rejected" and record["stream"] is stream
    assert_still_serves(gateway, issuer, upstream)


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_redirect_is_not_followed(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, stream: bool
) -> None:
    """The prompt goes to the configured URL only: a redirect is the upstream's failure, not a new address."""
    upstream.mode = "redirect"
    response, _ = post(gateway, issuer.mint(), {**CHAT, "stream": stream})
    assert response.status == 502 and response.json()["error"]["code"] == "upstream_error"
    assert "location" not in response.headers
    assert len(upstream.received) == 1  # the redirect target never saw the request
    assert record_of(gateway, response.headers["x-request-id"])["outcome"] == "error"
    assert_still_serves(gateway, issuer, upstream)


# -- after the first byte: an SSE error event, then the end ---------------------------------------


def test_stream_cut_midway_ends_with_an_error_event(gateway: Gateway, issuer: TestIssuer, upstream: Upstream) -> None:
    upstream.mode = "cut"  # two events, then the connection dies
    token = issuer.mint()
    got: list[str] = []
    started = time.monotonic()
    with (
        sdk(gateway, token) as client,
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as stream,
        pytest.raises(openai.APIError) as failed,
    ):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert time.monotonic() - started < 5
    assert got == ["the", " upstream"]
    assert isinstance(failed.value.body, dict) and failed.value.body["code"] == "upstream_error"
    assert "broke off" in failed.value.message

    response, elapsed = post(gateway, token, {**CHAT, "stream": True})
    assert response.status == 200 and elapsed < 5
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.body)
    assert len(events) == 3 and b"[DONE]" not in response.body
    assert events[-1].startswith(b"data: {")
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_error"
    assert last["error"]["request_id"] == response.headers["x-request-id"]

    record = record_of(gateway, response.headers["x-request-id"])
    assert record["status"] == 200 and record["outcome"] == "error" and record["error"]["code"] == "upstream_error"
    assert record["first_byte_ms"] is not None
    assert_still_serves(gateway, issuer, upstream)
    assert_no_secret_in(gateway, token)


def test_stream_that_hangs_ends_with_a_timeout_event(gateway: Gateway, issuer: TestIssuer, upstream: Upstream) -> None:
    upstream.mode, upstream.delay = "hang-stream", 5.0  # one event, then silence past the 1.5 s read timeout
    got: list[str] = []
    started = time.monotonic()
    with (
        sdk(gateway, issuer.mint()) as client,
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as stream,
        pytest.raises(openai.APIError) as failed,
    ):
        request_id = stream.response.headers["x-request-id"]
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    elapsed = time.monotonic() - started
    assert got == ["the"]
    assert 1.4 < elapsed < 4.5
    assert isinstance(failed.value.body, dict) and failed.value.body["code"] == "upstream_timeout"

    record = record_of(gateway, request_id)
    assert record["status"] == 200 and record["outcome"] == "error" and record["error"]["code"] == "upstream_timeout"
    assert_still_serves(gateway, issuer, upstream)


def test_client_leaving_a_stream_stops_the_upstream_call(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    upstream.mode, upstream.delay = "drip", 10.0  # a long generation
    with (
        sdk(gateway, issuer.mint()) as client,
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as stream,
    ):
        assert next(iter(stream)).choices[0].delta.content == "."
        request_id = stream.response.headers["x-request-id"]
    # The caller is gone: the gateway hangs up on the upstream rather than pay for the rest.
    wait_for(upstream.abandoned.is_set, timeout=3)
    record = record_of(gateway, request_id)
    assert record["outcome"] == "error" and record["error"]["code"] == "client_disconnected"
    assert_still_serves(gateway, issuer, upstream)


# -- a bug in the gateway's own code: still an answer in OpenAI's shape, and a record ---------------


def test_an_unexpected_error_is_a_500_in_openai_shape(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(endpoint: str, body: dict[str, Any], **_: Any) -> bytes:
        raise RuntimeError("internal detail sk-do-not-show")

    monkeypatch.setattr(gateway.app.providers["up"], "complete", broken)
    response, _ = post(gateway, issuer.mint(), CHAT)
    assert response.status == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and response.headers["x-request-id"] in error["message"]
    assert b"sk-do-not-show" not in response.body and b"RuntimeError" not in response.body
    record = record_of(gateway, response.headers["x-request-id"])
    assert record["status"] == 500 and record["outcome"] == "error" and record["error"]["code"] == "internal_error"


def test_an_unexpected_error_midstream_ends_the_stream_with_an_error_event(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(endpoint: str, body: dict[str, Any], **_: Any) -> AsyncGenerator[bytes, None]:
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "partial"}}]}\n\n'
        raise RuntimeError("internal detail sk-do-not-show")

    monkeypatch.setattr(gateway.app.providers["up"], "stream", broken)
    response, elapsed = post(gateway, issuer.mint(), {**CHAT, "stream": True})
    assert response.status == 200 and elapsed < 5
    events = sse_events(response.body)
    assert len(events) == 2 and b"partial" in events[0]
    assert orjson.loads(events[1].removeprefix(b"data: "))["error"]["code"] == "internal_error"
    assert b"sk-do-not-show" not in response.body
    record = record_of(gateway, response.headers["x-request-id"])
    assert record["status"] == 200 and record["outcome"] == "error" and record["error"]["code"] == "internal_error"


def test_an_oversized_upstream_refusal_is_not_relayed(make_gateway: MakeGateway, issuer: TestIssuer) -> None:
    """A 400 with a body over 1 MiB is the upstream's failure (502), not read into memory and relayed."""
    upstream = Upstream(mode="error400-huge").start()
    try:
        gateway = make_gateway(base_config(issuer, upstream))
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=issuer.mint(), max_retries=0)
        with client, pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        assert failed.value.status_code == 502 and "oversized body" in str(failed.value.message)
    finally:
        upstream.stop()
