"""The trail a real gateway leaves: linked records per request, committed before the upstream call, no secrets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from idgate.audit.records import parse_traceparent
from idgate.audit.stores import SqliteStore
from tests.audit.conftest import BACKENDS
from tests.conftest import UPSTREAM_KEY, MakeGateway, base_config
from tests.support import (
    PG_DSN,
    Gateway,
    TestIssuer,
    Upstream,
    break_audit_trail,
    drop_schema,
    raw_request,
    wait_for,
)

PROMPT = "the quarterly numbers for project bluebird"
HI = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})


def traceparent() -> tuple[str, str, str]:
    """A fresh W3C traceparent header, with its trace id and parent span id."""
    trace, span = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace}-{span}-01", trace, span


def of_request(gateway: Gateway, request_id: str) -> list[dict[str, Any]]:
    return [r for r in gateway.raw_records() if r["request_id"] == request_id]


def test_a_chat_leaves_linked_identity_decision_and_model_records(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    token = issuer.mint({"sub": "alice", "tenant": "acme", "act": {"sub": "planner"}, "task": "task-9"})
    header, trace, span = traceparent()
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
    with openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, default_headers={"traceparent": header}
    ) as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=messages, temperature=0.2)
    request_id = raw.headers["x-request-id"]
    wait_for(lambda: len(of_request(gateway, request_id)) == 3)
    identity, decision, model = of_request(gateway, request_id)
    assert [r["kind"] for r in (identity, decision, model)] == ["identity", "decision", "model"]
    for record in (identity, decision, model):
        assert record["v"] == 1 and record["trace_id"] == trace  # the caller's trace, honoured
    assert identity["parent_span"] == span
    assert identity["subject"]["id"] == "alice" and identity["subject"]["tenant"] == "acme"
    assert [a["id"] for a in identity["actors"]] == ["planner"] and identity["credential"]["task"] == "task-9"
    assert "status" not in identity  # it was committed before the call; the model record tells the end
    assert decision["action"] == "invoke_model" and decision["resource"] == {"type": "model", "id": "gpt-test"}
    assert decision["allowed"] is True and decision["policies"] and decision["revision"].startswith("pol_")
    assert decision["context"]["data_class"] == model["data_class"] and decision["context"]["task"] == "task-9"
    assert model["provider"] == "up" and model["upstream_model"] == "real-model"
    assert model["parameters"] == {"temperature": 0.2} and model["status"] == 200 and model["outcome"] == "ok"
    assert model["usage"]["total_tokens"] == 6 and model["latency_ms"] > 0
    sent = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
    assert model["prompt_sha256"] == hashlib.sha256(sent).hexdigest()
    assert model["completion_sha256"] == hashlib.sha256(raw.http_response.content).hexdigest()

    trail = orjson.dumps(gateway.raw_records()).decode()
    assert token not in trail and token.rsplit(".", 1)[1] not in trail  # no bearer token
    assert UPSTREAM_KEY not in trail  # no provider key
    assert PROMPT not in trail and "bluebird" not in trail  # no prompt text by default
    assert "upstream says hi" not in trail  # nor the completion
    with closing(sqlite3.connect(gateway.config.audit_path)) as connection:
        on_disk = b"".join(bytes(r[0]) for r in connection.execute("SELECT record FROM audit_records"))
    assert token.encode() not in on_disk and PROMPT.encode() not in on_disk


def test_record_content_keeps_the_text_redacted_by_the_detectors(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    """`audit.record_content`: prompt and completion text on record, what the detectors find redacted."""
    config = base_config(issuer, upstream)
    config["audit"] = {"record_content": True}
    # A card number in the prompt: an internal model cleared for it may still see it.
    config["providers"][0]["location"] = "internal"
    for model in config["models"]:
        model["max_data_class"] = "restricted"
    gateway = make_gateway(config)
    card, email = "4111 1111 1111 1111", "mallory@example.com"
    prompt = f"{PROMPT}: charge {card}, mail {email}"
    for stream, answer in ((False, "upstream says hi"), (True, "the upstream says hello")):
        body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": prompt}], "stream": stream})
        response = raw_request(
            gateway.url, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {issuer.mint()}"}
        )
        assert response.status == 200, response.json()
        request_id = response.headers["x-request-id"]
        wait_for(lambda: any(r["kind"] == "model" for r in of_request(gateway, request_id)))  # noqa: B023
        (model,) = [r for r in of_request(gateway, request_id) if r["kind"] == "model"]
        assert model["prompt"].startswith(PROMPT) and "[REDACTED:payment_card]" in model["prompt"]
        assert "[REDACTED:email]" in model["prompt"]
        assert model["completion"] == answer
    trail = orjson.dumps(gateway.raw_records()).decode()
    assert card not in trail and email not in trail and "4111" not in trail


def test_refusals_leave_identity_and_decision_records(gateway: Gateway, issuer: TestIssuer) -> None:
    body = orjson.dumps({"model": "beta-only", "messages": [{"role": "user", "content": PROMPT}]})
    token = issuer.mint({"tenant": "acme"})
    refused = raw_request(gateway.url, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {token}"})
    assert refused.status == 403
    unknown = raw_request(gateway.url, "POST", "/v1/chat/completions", body, {"Authorization": "Bearer nope"})
    assert unknown.status == 401
    identity, decision = of_request(gateway, refused.headers["x-request-id"])
    assert identity["kind"] == "identity" and identity["status"] == 403 and identity["outcome"] == "refused"
    assert decision["kind"] == "decision" and decision["allowed"] is False and decision["reason"] == "tenant"
    assert decision["decision_id"] == refused.json()["error"]["decision_id"]
    (anonymous,) = of_request(gateway, unknown.headers["x-request-id"])
    assert anonymous["kind"] == "identity" and anonymous["subject"] is None and anonymous["status"] == 401
    assert parse_traceparent(b"00-" + anonymous["trace_id"].encode() + b"-" + b"1" * 16 + b"-01") is not None
    assert token not in orjson.dumps(gateway.raw_records()).decode()


def test_a_malformed_traceparent_gets_a_new_trace(gateway: Gateway, issuer: TestIssuer) -> None:
    zero = "00-" + "0" * 32 + "-" + "1" * 16 + "-01"
    for bad in (zero, "00-xyz-abc-01", "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"):
        headers = {"Authorization": f"Bearer {issuer.mint()}", "traceparent": bad}
        response = raw_request(gateway.url, "POST", "/v1/chat/completions", HI, headers)
        assert response.status == 200
        records = of_request(gateway, response.headers["x-request-id"])
        traces = {r["trace_id"] for r in records}
        assert len(traces) == 1 and len(next(iter(traces))) == 32 and next(iter(traces)) not in bad
    assert parse_traceparent(b"01-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01-future") == ("a" * 32, "b" * 16)


def test_the_decision_is_committed_before_the_upstream_call(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    """The upstream, on receiving the call, finds its identity and decision records durable (a reader of its own).

    Durable: in the trail, or in the gateway's commit journal beside it, which a restart moves into the trail.
    """
    seen: list[set[str]] = []
    path = gateway.config.audit_path

    def look(body: dict[str, Any]) -> None:
        trace = body["messages"][0]["content"]
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as connection:
            stored = [row[0] for row in connection.execute("SELECT record FROM audit_records")]
        journaled = [
            line for file in path.with_name("audit.db.pending").iterdir() for line in file.read_bytes().split()
        ]
        kinds = {r["kind"] for r in map(orjson.loads, stored + journaled) if r.get("trace_id") == trace}
        seen.append(kinds)

    upstream.on_request = look
    for stream in (False, True):
        header, trace, _ = traceparent()
        body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": trace}], "stream": stream})
        headers = {"Authorization": f"Bearer {issuer.mint()}", "traceparent": header}
        assert raw_request(gateway.url, "POST", "/v1/chat/completions", body, headers).status == 200
    assert seen == [{"identity", "decision"}, {"identity", "decision"}]


def gateway_config(issuer: TestIssuer, upstream: Upstream, backend: str, schema: str) -> dict[str, Any]:
    config = base_config(issuer, upstream)
    config["providers"][0]["timeout"] = {"connect": 10, "read": 30}  # one test upstream takes all 2,000 at once
    # The client, the gateway and the upstream share one process here: its loop lags, and a lagging
    # revocation view refuses calls (503) after `max_staleness_seconds`. Not what this test is about.
    config["liveness"] = {"max_staleness_seconds": 30}
    if backend == "postgres":
        config["audit"] = {"backend": "postgres", "postgres_dsn": PG_DSN, "postgres_schema": schema}
    return config


@pytest.fixture
def trail_gateway(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, backend: str, pg_schema: str
) -> Iterator[Gateway]:
    """A gateway whose trail is on `backend` (PostgreSQL: in `pg_schema`, dropped after it stops)."""
    gateway = make_gateway(gateway_config(issuer, upstream, backend, pg_schema))
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_2000_concurrent_requests_leave_2000_decisions(
    trail_gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    gateway = trail_gateway
    headers = {"Authorization": f"Bearer {issuer.mint()}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> tuple[int, str]:
            async with session.post(f"{gateway.url}/v1/chat/completions", data=HI, headers=headers) as r:
                await r.read()
                return r.status, r.headers["x-request-id"]

        answers = await asyncio.gather(*(one() for _ in range(2000)))
    assert [status for status, _ in answers] == [200] * 2000
    assert len(upstream.received) == 2000
    assert gateway.app.audit.flush(20)
    store = gateway.app.audit.store
    decisions = [r for r in store.records(0, time.time() + 60, None, ("decision",))]
    assert len(decisions) == 2000
    assert {d["request_id"] for d in decisions} == {request_id for _, request_id in answers}
    assert gateway.app.audit.batches < 2000  # requests shared transactions


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_audit_store_that_cannot_commit_refuses_and_forwards_nothing(
    trail_gateway: Gateway, issuer: TestIssuer, upstream: Upstream, backend: str, pg_schema: str
) -> None:
    gateway = trail_gateway
    headers = {"Authorization": f"Bearer {issuer.mint()}"}
    assert raw_request(gateway.url, "POST", "/v1/chat/completions", HI, headers).status == 200
    assert gateway.app.audit.flush()
    if backend == "sqlite":
        break_audit_trail(gateway)
    else:
        drop_schema(pg_schema)
    forwarded = len(upstream.received)
    for stream in (False, True):
        payload = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
        refused = raw_request(gateway.url, "POST", "/v1/chat/completions", payload, headers)
        assert refused.status == 503
        assert "nothing was forwarded" in refused.json()["error"]["message"]
    assert len(upstream.received) == forwarded  # nothing more went upstream
    assert raw_request(gateway.url, "GET", "/readyz").status == 503


def test_fail_open_reads_serves_model_lists_and_says_so_later(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    config = base_config(issuer, upstream)
    config["audit"] = {"fail_open_reads": True}
    gateway = make_gateway(config)
    headers = {"Authorization": f"Bearer {issuer.mint()}"}
    assert gateway.app.audit.flush()
    break_audit_trail(gateway)
    forwarded = len(upstream.received)
    assert raw_request(gateway.url, "POST", "/v1/chat/completions", HI, headers).status == 503  # never writes
    assert len(upstream.received) == forwarded
    for path in ("/v1/models", "/v1/models/gpt-test"):
        assert raw_request(gateway.url, "GET", path, headers=headers).status == 200  # reads go on, unrecorded
    SqliteStore(gateway.config.audit_path).open()  # the store is back
    wait_for(lambda: gateway.app.audit.healthy, timeout=5)
    assert raw_request(gateway.url, "GET", "/v1/models", headers=headers).status == 200

    def noted() -> list[dict[str, Any]]:
        return [r for r in gateway.raw_records() if r.get("action") == "unrecorded_reads"]

    wait_for(lambda: bool(noted()), timeout=5)
    (note,) = noted()
    assert note["kind"] == "action" and note["details"]["count"] == 2
    assert note["details"]["first"] <= note["details"]["last"] <= note["details"]["recorded_at"]


def test_policy_reloads_and_the_start_are_on_record(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.cedar"
    policy.write_text((Path(__file__).parents[2] / "idgate/policy/demo/policy.cedar").read_text())
    config = base_config(issuer, upstream)
    config["policy"] = {"files": [str(policy)], "reload_interval_seconds": 0.05}
    gateway = make_gateway(config)
    started = [r for r in gateway.raw_records() if r.get("action") == "config_loaded"]
    assert len(started) == 1 and started[0]["details"]["issuers"] == ["corp"]
    assert len(started[0]["details"]["config_sha256"]) == 64
    policy.write_text(policy.read_text() + "\n// a comment changes the revision\n")
    wait_for(lambda: any(r.get("action") == "policy_reload" for r in gateway.raw_records()), timeout=5)
    policy.write_text("this is not cedar")
    wait_for(lambda: any(r.get("outcome") == "refused" for r in gateway.raw_records()), timeout=5)
    reloads = [r for r in gateway.raw_records() if r.get("action") == "policy_reload"]
    assert reloads[0]["outcome"] in ("ok", "unchanged") and reloads[0]["details"]["revision"].startswith("pol_")
    assert reloads[-1]["outcome"] == "refused" and reloads[-1]["details"]["problems"]
