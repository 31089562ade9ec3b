"""W3C trace context upstream: model providers and MCP tool servers get a `traceparent` in the request's trace."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from idgate.audit.export import request_span_id
from idgate.audit.records import RequestFacts, parse_traceparent, upstream_traceparent
from tests.audit.test_export import Collector, plain
from tests.conftest import MakeGateway, base_config

# why: the MCP tests' fixtures, used here by name
from tests.mcp.conftest import ENTITIES, client, make_mcp_gateway, mcp_gateway, tool_server  # noqa: F401
from tests.mcp.toolserver import ToolServer
from tests.support import Gateway, TestIssuer, Upstream, raw_request, wait_for

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    yield server
    server.server.stop()


def chat(gateway: Gateway, token: str, headers: dict[str, str], stream: bool = False) -> str:
    body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    response = raw_request(
        gateway.url, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {token}", **headers}
    )
    assert response.status == 200
    return response.headers["x-request-id"]


def sent_upstream(upstream: Upstream) -> dict[str, str]:
    """The trace headers of the last call the upstream received (names lowercased)."""
    headers = {k.lower(): v for k, v in upstream.received[-1]["headers"].items()}
    return {k: headers[k] for k in TRACE_HEADERS if k in headers}


def model_record(gateway: Gateway, request_id: str) -> dict[str, Any]:
    wait_for(lambda: any(r["kind"] == "model" and r["request_id"] == request_id for r in gateway.raw_records()))
    return next(r for r in gateway.raw_records() if r["kind"] == "model" and r["request_id"] == request_id)


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_call_carries_the_callers_trace_and_the_gateways_span(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, stream: bool
) -> None:
    trace, parent = os.urandom(16).hex(), os.urandom(8).hex()
    headers = {
        "traceparent": f"00-{trace}-{parent}-01",
        "tracestate": "vendor=opaque-user-42",
        "baggage": "user.id=alice,session=s3cr3t",
    }
    request_id = chat(gateway, issuer.mint(), headers, stream)
    sent = sent_upstream(upstream)
    assert set(sent) == {"traceparent"}  # the caller's tracestate and baggage stay on this side
    span = request_span_id(request_id).hex()  # the request's span, as the OTLP export names it
    assert sent["traceparent"] == f"00-{trace}-{span}-01" and span != parent
    assert model_record(gateway, request_id)["upstream_span"] == span


def test_a_trace_the_gateway_starts_goes_upstream_unsampled(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    request_id = chat(gateway, issuer.mint(), {})
    record = model_record(gateway, request_id)
    assert sent_upstream(upstream) == {"traceparent": f"00-{record['trace_id']}-{record['upstream_span']}-00"}


def test_a_malformed_traceparent_is_not_relayed(gateway: Gateway, issuer: TestIssuer, upstream: Upstream) -> None:
    token = issuer.mint()
    for bad in ("00-" + "0" * 32 + "-" + "1" * 16 + "-01", "00-xyz-abc-01", "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"):
        request_id = chat(gateway, token, {"traceparent": bad, "tracestate": "a=b"})
        sent = sent_upstream(upstream)
        record = model_record(gateway, request_id)
        assert set(sent) == {"traceparent"} and sent["traceparent"] != bad
        assert parse_traceparent(sent["traceparent"].encode()) == (record["trace_id"], record["upstream_span"])
    # A later version's traceparent is read as 00; flags W3C does not define are not passed on.
    trace = os.urandom(16).hex()
    chat(gateway, token, {"traceparent": f"01-{trace}-{'b' * 16}-ff-future"})
    assert sent_upstream(upstream)["traceparent"].startswith(f"00-{trace}-")
    assert sent_upstream(upstream)["traceparent"].endswith("-03")


def test_the_upstream_span_parent_is_the_exported_request_span(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, collector: Collector
) -> None:
    """A tracing backend joins the provider's spans to the gateway's: their parent is a span it received."""
    config = base_config(issuer, upstream)
    config["audit"] = {"export": {"otlp_endpoint": collector.server.url}}
    gateway = make_gateway(config)
    trace = os.urandom(16).hex()
    chat(gateway, issuer.mint(), {"traceparent": f"00-{trace}-{os.urandom(8).hex()}-01"})
    wait_for(lambda: any(s.trace_id.hex() == trace for s in collector.spans()), timeout=10)
    (span,) = [s for s in collector.spans() if s.trace_id.hex() == trace]
    assert sent_upstream(upstream)["traceparent"] == f"00-{trace}-{span.span_id.hex()}-01"
    gateway.stop()  # why: its exporter's last posts end before the collector (torn down first) stops


def test_a_trace_the_gateway_starts_and_exports_goes_upstream_sampled(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, collector: Collector
) -> None:
    config = base_config(issuer, upstream)
    config["audit"] = {"export": {"otlp_endpoint": collector.server.url}}
    gateway = make_gateway(config)
    request_id = chat(gateway, issuer.mint(), {})
    record = model_record(gateway, request_id)
    assert sent_upstream(upstream) == {"traceparent": f"00-{record['trace_id']}-{record['upstream_span']}-01"}
    gateway.stop()  # why: its exporter's last posts end before the collector (torn down first) stops


def test_new_trace_flags_say_whether_the_gateway_records_the_trace() -> None:
    facts = RequestFacts("req_1", "POST", "/v1/chat/completions")
    assert upstream_traceparent(facts, "01") == f"00-{facts.trace_id}-{request_span_id('req_1').hex()}-01"
    facts.trace_flags = "00"  # the caller's say wins: it did not sample this trace
    assert upstream_traceparent(facts, "01").endswith("-00")


async def test_an_mcp_tool_server_gets_the_trace_and_never_the_callers_headers(
    mcp_gateway: Gateway,  # noqa: F811 - the fixture imported above
    issuer: TestIssuer,
    tool_server: ToolServer,  # noqa: F811
) -> None:
    trace, parent = os.urandom(16).hex(), os.urandom(8).hex()
    headers = {"traceparent": f"00-{trace}-{parent}-01", "tracestate": "vendor=x", "baggage": "user.id=alice"}
    async with client(mcp_gateway, issuer.mint({"sub": "alice"}), **headers) as mcp:
        await mcp.call_tool("read_invoice", {"invoice": "T1"})
    (call,) = tool_server.calls("read_invoice")
    assert {k: v for k, v in call.headers.items() if k in TRACE_HEADERS}.keys() == {"traceparent"}
    assert all("tracestate" not in s.headers and "baggage" not in s.headers for s in tool_server.seen)
    (action,) = [r for r in mcp_gateway.raw_records() if r["kind"] == "action" and r["action"] == "tool_call"]
    span = request_span_id(action["request_id"]).hex()
    assert call.headers["traceparent"] == f"00-{trace}-{span}-01" and action["details"]["upstream_span"] == span
    # A malformed one is not relayed: the call starts a trace of its own, the one on record.
    async with client(mcp_gateway, issuer.mint({"sub": "alice"}), traceparent="00-nope-01") as mcp:
        await mcp.call_tool("read_invoice", {"invoice": "T2"})
    last = tool_server.calls("read_invoice")[-1]
    actions = [r for r in mcp_gateway.raw_records() if r["kind"] == "action" and r["action"] == "tool_call"]
    span = request_span_id(actions[-1]["request_id"]).hex()
    assert last.headers["traceparent"] == f"00-{actions[-1]['trace_id']}-{span}-00"


async def test_an_mcp_tool_call_span_is_exported_as_the_tool_servers_parent(
    make_gateway: MakeGateway,
    issuer: TestIssuer,
    tool_server: ToolServer,  # noqa: F811
    collector: Collector,
    tmp_path: Path,
) -> None:
    entities = tmp_path / "entities.yaml"
    entities.write_text(ENTITIES)
    gateway = make_gateway(
        {
            "issuers": [{"name": "corp", "issuer": issuer.issuer, "discovery": True, "refetch_interval_seconds": 0}],
            "policy": {"entities": [str(entities)]},
            "mcp": {"servers": [{"name": "tools", "url": tool_server.url}]},
            "audit": {"export": {"otlp_endpoint": collector.server.url}},
        }
    )
    tool_server.issuer, tool_server.jwks_url = gateway.url, f"{gateway.url}/.well-known/jwks.json"
    tool_server.audience = tool_server.url
    trace = os.urandom(16).hex()
    async with client(
        gateway, issuer.mint({"sub": "alice"}), traceparent=f"00-{trace}-{os.urandom(8).hex()}-01"
    ) as mcp:
        await mcp.call_tool("read_invoice", {"invoice": "T3"})
    (call,) = tool_server.calls("read_invoice")
    parent = call.headers["traceparent"].split("-")[2]
    wait_for(lambda: any(s.span_id.hex() == parent for s in collector.spans()), timeout=10)
    (span,) = [s for s in collector.spans() if s.span_id.hex() == parent]
    attributes = {a.key: plain(a.value) for a in span.attributes}
    assert span.trace_id.hex() == trace and attributes["idgate.tool"] == "tools/read_invoice"
    assert attributes["http.response.status_code"] == 200 and attributes["idgate.decision.allowed"] is True
    assert span.end_time_unix_nano >= span.start_time_unix_nano
    gateway.stop()  # why: its exporter's last posts end before the collector (torn down first) stops
