"""Exports of the trail: JSON lines for a SIEM, OTLP to a real loopback receiver that decodes the protobuf."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.conftest import MakeGateway, base_config
from tests.support import AiohttpServer, TestIssuer, Upstream, raw_request, wait_for


class Collector:
    """An OTLP/HTTP receiver: decodes what arrives at /v1/traces and /v1/logs with the OTLP protobuf schema."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.logs: list[ExportLogsServiceRequest] = []
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/logs", self._logs)
        self.server = AiohttpServer(app)

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        self.traces.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=ExportTraceServiceRequest().SerializeToString(), content_type="application/x-protobuf")

    async def _logs(self, request: web.Request) -> web.Response:
        self.logs.append(ExportLogsServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self) -> list[Any]:
        return [s for t in self.traces for rs in t.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def log_records(self) -> list[Any]:
        return [r for x in self.logs for rl in x.resource_logs for sl in rl.scope_logs for r in sl.log_records]


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    yield server
    server.server.stop()


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def chat(url: str, token: str, traceparent: str | None = None) -> str:
    body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "secret plans"}]})
    headers = {"Authorization": f"Bearer {token}", **({"traceparent": traceparent} if traceparent else {})}
    response = raw_request(url, "POST", "/v1/chat/completions", body, headers)
    assert response.status == 200
    return response.headers["x-request-id"]


def test_jsonl_export_has_every_committed_record(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    target = tmp_path / "siem" / "audit.jsonl"
    config = base_config(issuer, upstream)
    config["audit"] = {"export": {"jsonl": str(target)}}
    gateway = make_gateway(config)
    token = issuer.mint()
    chat(gateway.url, token)
    chat(gateway.url, token)
    stored = gateway.raw_records()
    wait_for(lambda: target.exists() and len(target.read_bytes().splitlines()) == len(stored))
    exported = [orjson.loads(line) for line in target.read_bytes().splitlines()]
    assert exported == stored and [r["kind"] for r in exported][1:4] == ["identity", "decision", "model"]
    assert token not in target.read_text() and "secret plans" not in target.read_text()


def test_otlp_export_sends_a_span_per_request_and_records_as_logs(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, collector: Collector
) -> None:
    config = base_config(issuer, upstream)
    config["audit"] = {"export": {"otlp_endpoint": collector.server.url, "service_name": "idgate-test"}}
    gateway = make_gateway(config)
    token = issuer.mint({"sub": "alice", "tenant": "acme", "act": {"sub": "planner"}, "task": "task-3"})
    trace, parent = os.urandom(16).hex(), os.urandom(8).hex()
    request_id = chat(gateway.url, token, f"00-{trace}-{parent}-01")
    wait_for(lambda: any(s.trace_id.hex() == trace for s in collector.spans()), timeout=10)
    (span,) = [s for s in collector.spans() if s.trace_id.hex() == trace]
    assert span.parent_span_id.hex() == parent and span.name == "POST /v1/chat/completions"
    assert span.end_time_unix_nano > span.start_time_unix_nano
    attributes = {a.key: plain(a.value) for a in span.attributes}
    assert attributes["enduser.id"] == "alice" and attributes["idgate.subject.tenant"] == "acme"
    assert attributes["idgate.actors"] == ["planner"] and attributes["idgate.task"] == "task-3"
    assert attributes["idgate.request_id"] == request_id and attributes["http.response.status_code"] == 200
    assert attributes["idgate.decision.allowed"] is True and attributes["idgate.decision.policies"]
    assert attributes["gen_ai.request.model"] == "gpt-test" and attributes["gen_ai.usage.output_tokens"] == 3
    resource = {
        a.key: plain(a.value) for t in collector.traces for rs in t.resource_spans for a in rs.resource.attributes
    }
    assert resource["service.name"] == "idgate-test"

    wait_for(lambda: len([r for r in collector.log_records() if r.trace_id.hex() == trace]) == 3, timeout=10)
    logs = [r for r in collector.log_records() if r.trace_id.hex() == trace]
    assert [r.event_name for r in logs] == ["idgate.audit.identity", "idgate.audit.decision", "idgate.audit.model"]
    assert all(r.span_id == span.span_id for r in logs)  # each record sits in its request's span
    bodies = [orjson.loads(plain(r.body)) for r in logs]
    assert [b["request_id"] for b in bodies] == [request_id] * 3
    wire = b"".join(t.SerializeToString() for t in collector.traces) + b"".join(
        x.SerializeToString() for x in collector.logs
    )
    assert token.encode() not in wire and b"secret plans" not in wire

    # A refusal's records come as [identity (ended), decision]: its span still carries the decision.
    refused_trace = os.urandom(16).hex()
    body = orjson.dumps({"model": "beta-only", "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": f"Bearer {token}", "traceparent": f"00-{refused_trace}-{parent}-01"}
    assert raw_request(gateway.url, "POST", "/v1/chat/completions", body, headers).status == 403
    wait_for(lambda: any(s.trace_id.hex() == refused_trace for s in collector.spans()), timeout=10)
    (refusal,) = [s for s in collector.spans() if s.trace_id.hex() == refused_trace]
    said = {a.key: plain(a.value) for a in refusal.attributes}
    assert said["http.response.status_code"] == 403 and said["idgate.decision.allowed"] is False
    gateway.stop()  # why: its exporter's last posts end before the collector (torn down first) stops
