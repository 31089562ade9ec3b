"""Copies of the trail for other systems: JSON lines for a SIEM, OpenTelemetry for tracing.

Exports see records only after their batch is committed (the store stays the
record of truth; an export that fails loses copies, never records), and they
get exactly what the store has: no token, no secret, no prompt text.

- `JsonlExport`: each record as one JSON line (sorted keys, as hashed), appended
  to a file, or to stdout with `-`. Runs on the writer's thread: one buffered
  write and one flush per batch.
- `OtlpExport`: OTLP/HTTP (protobuf) to `{endpoint}/v1/traces` and
  `{endpoint}/v1/logs`, from a thread of its own with a bounded queue (a slow
  or absent collector never slows the writer; what does not fit is counted as
  dropped). Per request, one server span `METHOD PATH` in the request's W3C
  trace (the caller's `traceparent` is its parent), from its identity record
  to its end, with the identity as attributes (`enduser.id`, tenant, actor
  chain, credential id and kind, task), the decision (id, allowed, policies)
  and the model call (`gen_ai.*` names: provider, model, token usage) or the
  MCP tool call (`idgate.tool`; the span ends with the `tool_call` record). Every
  record is also a log event in that trace and span, its JSON as the body.
  The request's span id is derived from its request id (`request_span_id`); it
  is also the parent span in the `traceparent` of the request's upstream call,
  so a provider's or tool server's spans hang under the gateway's.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import sys
import threading
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson

__all__ = ["JsonlExport", "OtlpExport", "request_span_id"]

log = logging.getLogger("idgate.audit")


class JsonlExport:
    """Appends each committed record as a JSON line to `target` (a path, or `-` for stdout)."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._file: IO[bytes] | None = None

    def _out(self) -> IO[bytes]:
        if self._file is None:
            if self._target == "-":
                self._file = sys.stdout.buffer
            else:
                path = Path(self._target)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("ab")
        return self._file

    def __call__(self, records: list[dict[str, Any]]) -> None:
        try:
            out = self._out()
            out.write(b"".join(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) + b"\n" for r in records))
            out.flush()
        except OSError as exc:
            log.warning("audit export to %s failed: %s", self._target, exc.strerror or exc)

    def close(self) -> None:
        if self._file is not None and self._target != "-":
            self._file.close()
        self._file = None


def request_span_id(request_id: str) -> bytes:
    """The 8-byte span id of a request's span: derived from its id, so every record can name it."""
    return hashlib.sha256(request_id.encode()).digest()[:8]


def _value(value: Any) -> Any:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue

    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def _attributes(items: dict[str, Any]) -> list[Any]:
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    return [KeyValue(key=k, value=_value(v)) for k, v in items.items() if v is not None and v != []]


def _trace_id(record: dict[str, Any]) -> bytes:
    try:
        return bytes.fromhex(str(record.get("trace_id")))
    except ValueError:
        return b""


def _nanos(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class OtlpExport:
    """Sends spans and log events over OTLP/HTTP from its own thread; never blocks the writer."""

    MAX_QUEUED_BATCHES = 1000
    MAX_OPEN_REQUESTS = 10_000

    def __init__(self, endpoint: str, *, service_name: str = "idgate", timeout: float = 5.0) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._service = service_name
        self._timeout = timeout
        self._queue: queue.Queue[list[dict[str, Any]] | None] = queue.Queue(self.MAX_QUEUED_BATCHES)
        # Requests whose identity record came but whose end did not yet: for the span's start and attributes.
        self._open: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.sent = 0
        self.post: Callable[[str, bytes], None] = self._post

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="idgate-otlp", daemon=True)
        self._thread.start()

    def __call__(self, records: list[dict[str, Any]]) -> None:
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            self.dropped += len(records)

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                self._export(batch)
            except Exception as exc:  # noqa: BLE001 - an export failing loses copies, never records
                log.warning("audit export to OTLP failed: %s", type(exc).__name__)

    def _post(self, path: str, body: bytes) -> None:
        request = urllib.request.Request(  # noqa: S310 - the URL is the configured http(s) endpoint
            f"{self._endpoint}{path}", data=body, method="POST", headers={"Content-Type": "application/x-protobuf"}
        )
        with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
            response.read()

    def _export(self, batch: list[dict[str, Any]]) -> None:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
        from opentelemetry.proto.resource.v1.resource_pb2 import Resource
        from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans

        resource = Resource(attributes=_attributes({"service.name": self._service}))
        # why two passes: a refused request's records are [identity (ended), decision, ...] in one batch;
        # its span, closed by the identity record, must carry the decision that came after it.
        for record in batch:
            self._note(record)
        spans = [span for record in batch if (span := self._span(record)) is not None]
        logs = [
            LogRecord(
                time_unix_nano=_nanos(float(record.get("time") or 0)),
                severity_text="INFO",
                body=_value(orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode()),
                attributes=_attributes(
                    {"idgate.record.kind": record.get("kind"), "idgate.request_id": record.get("request_id")}
                ),
                trace_id=_trace_id(record),
                span_id=request_span_id(str(record.get("request_id"))),
                event_name=f"idgate.audit.{record.get('kind')}",
            )
            for record in batch
        ]
        if spans:
            traces = ExportTraceServiceRequest(
                resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=spans)])]
            )
            self.post("/v1/traces", traces.SerializeToString())
        logged = ExportLogsServiceRequest(
            resource_logs=[ResourceLogs(resource=resource, scope_logs=[ScopeLogs(log_records=logs)])]
        )
        self.post("/v1/logs", logged.SerializeToString())
        self.sent += len(batch)

    def _note(self, record: dict[str, Any]) -> None:
        """Keep a request's identity and (first) decision until the record that ends it."""
        kind, request_id = record.get("kind"), str(record.get("request_id"))
        if kind == "identity":
            self._open.setdefault(request_id, {})["identity"] = record
            while len(self._open) > self.MAX_OPEN_REQUESTS:
                self._open.popitem(last=False)
        elif kind == "decision":
            self._open.setdefault(request_id, {}).setdefault("decision", record)

    def _span(self, record: dict[str, Any]) -> Any:
        """The request's span, when `record` ends it; None otherwise."""
        kind, request_id = record.get("kind"), str(record.get("request_id"))
        if kind == "identity":
            if "status" not in record:
                return None
        elif kind == "action" and record.get("action") == "tool_call" and request_id in self._open:
            pass  # an MCP tool call's end: its span is emitted too, or the tool server's spans would have no parent
        elif kind != "model":
            return None
        parts = self._open.pop(request_id, {})
        return self._build(record, parts.get("identity") or {}, parts.get("decision"))

    def _build(self, end: dict[str, Any], identity: dict[str, Any], decision: dict[str, Any] | None) -> Any:
        from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

        start = float(identity.get("time") or end.get("time") or 0)
        details = end.get("details") or {}
        if "latency_ms" in end:
            latency = float(end.get("latency_ms") or 0) / 1000
        else:  # an action record: it was written when the request ended
            latency = max(0.0, float(end.get("time") or start) - start)
        subject = identity.get("subject") or {}
        credential = identity.get("credential") or {}
        usage = end.get("usage") or {}
        attributes: dict[str, Any] = {
            "idgate.request_id": end.get("request_id"),
            "http.request.method": identity.get("method"),
            "url.path": identity.get("path"),
            "http.response.status_code": end.get("status", details.get("status")),
            "enduser.id": subject.get("id"),
            "idgate.subject.kind": subject.get("kind"),
            "idgate.subject.tenant": subject.get("tenant"),
            "idgate.subject.issuer": subject.get("issuer"),
            "idgate.actors": [a.get("id") for a in identity.get("actors") or ()],
            "idgate.credential.kind": credential.get("kind"),
            "idgate.credential.id": credential.get("id"),
            "idgate.credential.binding": credential.get("binding"),
            "idgate.task": credential.get("task"),
            "idgate.outcome": end.get("outcome"),
        }
        if decision is not None:
            attributes.update(
                {
                    "idgate.decision.id": decision.get("decision_id"),
                    "idgate.decision.allowed": decision.get("allowed"),
                    "idgate.decision.policies": decision.get("policies"),
                    "idgate.data_class": (decision.get("context") or {}).get("data_class"),
                }
            )
        if end.get("kind") == "action":
            attributes["idgate.tool"] = end.get("target")
            attributes["idgate.tool.credential_id"] = details.get("credential_id")
        if end.get("kind") == "model":
            attributes.update(
                {
                    "gen_ai.system": end.get("provider"),
                    "gen_ai.request.model": end.get("model"),
                    "gen_ai.response.model": end.get("upstream_model"),
                    "gen_ai.usage.input_tokens": usage.get("prompt_tokens"),
                    "gen_ai.usage.output_tokens": usage.get("completion_tokens"),
                }
            )
        parent = identity.get("parent_span")
        failed = end.get("outcome") == "error"
        return Span(
            trace_id=_trace_id(end) or _trace_id(identity),
            span_id=request_span_id(str(end.get("request_id"))),
            parent_span_id=bytes.fromhex(parent) if isinstance(parent, str) else b"",
            name=f"{identity.get('method') or 'POST'} {identity.get('path') or ''}".strip(),
            kind=Span.SPAN_KIND_SERVER,
            start_time_unix_nano=_nanos(start),
            end_time_unix_nano=_nanos(start + latency),
            attributes=_attributes(attributes),
            status=Status(code=Status.STATUS_CODE_ERROR if failed else Status.STATUS_CODE_OK),
        )
