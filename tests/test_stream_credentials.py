"""A chat answer does not outlive its caller's credential: revoked, or expired, while the model is still answering.

The credential is checked when the request comes; an answer may take minutes. Before an answer goes out, and
before each chunk of a stream, the gateway asks again (in memory: at once when this process took a revocation in,
else every `RECHECK_SECONDS`, and at `exp`); a credential that lapsed gets a 401 instead of the answer, or an error
event that ends its stream; the upstream call is hung up, and the record says why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

from idgate.proxy import api
from tests.conftest import MakeGateway, base_config
from tests.support import Gateway, TestIssuer, Upstream, wait_for


@pytest.fixture
def gateway(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> Gateway:
    monkeypatch.setattr(api, "RECHECK_SECONDS", 0.05)  # why: the test need not wait a second for the check
    upstream.mode, upstream.delay = "drip", 10.0  # a long generation: one event every 50 ms
    return make_gateway(base_config(issuer, upstream))


def stream_until_it_fails(gateway: Gateway, token: str, midway: Callable[[], None]) -> tuple[int, openai.APIError, str]:
    """Stream a chat; after its first event call `midway()`; the events got and the error that ended the stream."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=10)
    got = 0
    with (
        client,
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as stream,
        pytest.raises(openai.APIError) as failed,
    ):
        request_id = stream.response.headers["x-request-id"]
        for _ in stream:
            got += 1
            if got == 1:
                midway()
    return got, failed.value, request_id


def test_a_stream_ends_when_its_token_is_revoked(gateway: Gateway, issuer: TestIssuer, upstream: Upstream) -> None:
    token = issuer.mint()

    def revoke() -> None:
        assert httpx2.post(f"{gateway.url}/oauth2/revoke", data={"token": token}, timeout=5).status_code == 200

    started = time.monotonic()
    got, error, request_id = stream_until_it_fails(gateway, token, revoke)
    assert time.monotonic() - started < 5  # not the 10 s the upstream would go on for
    assert got < 20
    assert isinstance(error.body, dict) and error.body["code"] == "credential_revoked"
    assert "revoked" in error.message
    wait_for(upstream.abandoned.is_set, timeout=3)  # the upstream call was hung up, not paid for to the end
    record = gateway.record(request_id)
    assert record["status"] == 200 and record["outcome"] == "error"
    assert record["error"]["code"] == "credential_revoked"


def test_a_stream_ends_when_its_token_expires(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "RECHECK_SECONDS", 0.05)
    upstream.mode, upstream.delay = "drip", 10.0
    config = base_config(issuer, upstream)
    config["server"] = {**config.get("server", {}), "clock_skew_seconds": 1}  # the stream allows what admission did
    gateway = make_gateway(config)
    expires = math.ceil(time.time() + 1.0)  # whole seconds, as `exp` is
    token = issuer.mint({"exp": expires})
    got, error, request_id = stream_until_it_fails(gateway, token, lambda: None)
    assert got >= 1  # the answer had begun
    assert time.time() >= expires + 1 and time.time() - expires < 4
    assert isinstance(error.body, dict) and error.body["code"] == "credential_expired"
    wait_for(upstream.abandoned.is_set, timeout=3)
    assert gateway.record(request_id)["error"]["code"] == "credential_expired"


def revoke(gateway: Gateway, token: str) -> None:
    assert httpx2.post(f"{gateway.url}/oauth2/revoke", data={"token": token}, timeout=5).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_that_comes_after_the_revocation_is_not_given(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, stream: bool
) -> None:
    gateway = make_gateway(base_config(issuer, upstream))  # RECHECK_SECONDS as shipped
    upstream.mode, upstream.delay = "slow", 1.0  # the model thinks for a second before its first byte
    token = issuer.mint()
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=10)

    def ask() -> object:
        create = client.chat.completions.create
        answer = create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=stream)
        return list(answer) if stream else answer

    with client, ThreadPoolExecutor(1) as pool:
        asked = pool.submit(ask)
        time.sleep(0.3)
        revoke(gateway, token)
        with pytest.raises(openai.AuthenticationError) as refused:
            asked.result(timeout=10)
    assert refused.value.status_code == 401
    assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "credential_revoked"
    assert refused.value.request_id is not None
    record = gateway.record(refused.value.request_id)
    assert record["status"] == 401 and record["error"]["code"] == "credential_revoked"


def test_a_stream_ends_at_once_when_this_process_takes_the_revocation_in(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    gateway = make_gateway(base_config(issuer, upstream))  # RECHECK_SECONDS as shipped: a second
    upstream.mode, upstream.delay = "drip", 10.0
    token = issuer.mint()
    revoked_at: list[float] = []

    def revoke_now() -> None:
        revoke(gateway, token)
        revoked_at.append(time.monotonic())

    got, error, _ = stream_until_it_fails(gateway, token, revoke_now)
    # why: the drip sends an event every 50 ms; a check once a second would let ~20 through
    assert time.monotonic() - revoked_at[0] < 0.5 and got < 8
    assert isinstance(error.body, dict) and error.body["code"] == "credential_revoked"
