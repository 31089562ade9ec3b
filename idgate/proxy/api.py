"""The OpenAI-compatible endpoints, and the pipeline every call goes through.

    identity ─► parse ─► policy ─► forward ─► response
        └──────────┴─────────┴─────────┴──────────┴──► audit record

Each call: the bearer token becomes a `Caller` (401 otherwise); the body is
read within the size limit and parsed (400/413); the model is looked up (404);
the authorizer decides (403 with the decision id); the request goes upstream
with the upstream model name and a pseudonymous user id, never the caller's
token (502/504 on failure; 4xx answers relayed as they are). The audit trail
has the identity and decision records (the model's, and one per function tool
the request offers) committed before the upstream call (invariant 6), and the
model record (or, for a refusal, the identity and decision records) committed
before the response completes. The upstream call carries a W3C `traceparent`
in the request's trace (`upstream_traceparent`; never the caller's
`tracestate` or `baggage`). A stream that fails
midway ends with an SSE error event (`data: {"error": ...}`), and so does one
whose caller's credential lapses on the way (expired, revoked, task or session
ended: asked again in memory at once when this process learns of a revocation,
else every `RECHECK_SECONDS`); an answer whose caller's credential lapsed while
upstream answered is refused (401) instead; a caller who leaves a stream ends the upstream
call; an unexpected exception is a 500 in the same error shape, never a
traceback.
Fields the gateway does not act on (`tools`, `tool_choice`,
`response_format`, anything new) pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import orjson

from idgate.audit.records import (
    RequestFacts,
    decision_record,
    identity_record,
    model_record,
    tool_decision_records,
    trace_context,
    upstream_traceparent,
)
from idgate.audit.writer import AuditWriter
from idgate.classify.content import texts_of
from idgate.config import ModelConfig
from idgate.errors import BadRequest, IdgateError, UnknownModel, UpstreamError, shown
from idgate.identity.gate import RECHECK_SECONDS, Gate
from idgate.identity.principal import Caller
from idgate.identity.pseudonym import Pseudonyms
from idgate.policy.decision import Authorizer, Resource
from idgate.providers.base import Endpoint, Provider, UpstreamRejected
from idgate.proxy.admission import DATA_CLASS_HEADER, Admission, Admitted, Refused
from idgate.proxy.http import Receive, Request, Send, error_payload, send_bytes, send_error, send_json

__all__ = ["Gateway", "Route"]

log = logging.getLogger("idgate.proxy")

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]"
CONTENT_LIMIT = 64 * 1024  # characters of prompt or completion kept with `audit.record_content`
_STREAM_KEPT = 1 << 20  # bytes of a stream read for its text


class Route:
    """A model as the gateway serves it: its config and its provider."""

    __slots__ = ("model", "provider")

    def __init__(self, model: ModelConfig, provider: Provider) -> None:
        self.model = model
        self.provider = provider


class Gateway:
    def __init__(
        self,
        *,
        gate: Gate,
        authorizer: Authorizer,
        admission: Admission,
        routes: Mapping[str, Route],
        audit: AuditWriter,
        pseudonyms: Pseudonyms,
        max_body_bytes: int,
        fail_open_reads: bool = False,
        redact: Callable[[str], str] | None = None,
        new_trace_flags: str = "00",
    ) -> None:
        """`fail_open_reads`: model listings are served (and counted) while the audit store is down.

        `new_trace_flags`: the upstream `traceparent`'s flags in a trace the gateway started (the caller
        sent none): `01` when the gateway records its traces (an OTLP export), else `00`.

        `redact`: with `audit.record_content`, the detectors' redaction; the model record then keeps
        the prompt and completion text through it (at most `CONTENT_LIMIT` characters each).
        """
        self._gate = gate
        self._authorizer = authorizer
        self._admission = admission
        self._routes = routes
        self._audit = audit
        self._pseudonyms = pseudonyms
        self._max_body = max_body_bytes
        self._fail_open_reads = fail_open_reads
        self._redact = redact
        self._new_trace_flags = new_trace_flags

    # -- endpoints -----------------------------------------------------------------

    async def chat_completions(self, request: Request, send: Send) -> None:
        await self._call(request, send, "chat/completions", "chat")

    async def embeddings(self, request: Request, send: Send) -> None:
        await self._call(request, send, "embeddings", "embedding")

    async def models(self, request: Request, send: Send) -> None:
        facts = _facts(request)
        try:
            caller = facts.caller = await self._gate.caller(request)
            listed = self._visible_models(caller)
            await self._record_read(facts)
        except IdgateError as error:
            await self._refuse(send, facts, error)
            return
        await send_json(send, 200, {"object": "list", "data": listed}, request.id)

    async def model(self, request: Request, send: Send) -> None:
        """`GET /v1/models/{id}`: one model, if this caller may use it (404 otherwise)."""
        facts = _facts(request)
        name = request.path.removeprefix("/v1/models/")
        facts.model = name
        try:
            caller = facts.caller = await self._gate.caller(request)
            found = [m for m in self._visible_models(caller) if m["id"] == name]
            if not found:
                raise UnknownModel(f"model `{shown(name)}` does not exist")
            await self._record_read(facts)
        except IdgateError as error:
            await self._refuse(send, facts, error)
            return
        await send_json(send, 200, found[0], request.id)

    async def _record_read(self, facts: RequestFacts) -> None:
        """A read's record; with `fail_open_reads`, a store that is down lets it through, counted."""
        try:
            await self._audit.commit(*self._finish(facts, 200))
        except IdgateError:
            if not self._fail_open_reads:
                raise
            self._audit.note_unrecorded_read()

    def _visible_models(self, caller: Caller) -> list[dict[str, Any]]:
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": route.provider.name}
            for name, route in self._routes.items()
            if self._authorizer.authorize(caller, "invoke_model", Resource("model", name), {}).allowed
        ]

    # -- the pipeline ----------------------------------------------------------------

    async def _call(self, request: Request, send: Send, endpoint: Endpoint, kind: str) -> None:
        facts = _facts(request)
        try:
            # why: noted before the checks run, so a revocation taken in while they await counts as a change
            facts.standing, facts.recheck_at = self._gate.changes, time.perf_counter() + RECHECK_SECONDS
            facts.caller = await self._gate.caller(request)
            body = await request.json_object(self._max_body)
            route = self._route(body, kind, facts)
            self._admit(facts.caller, route, body, request, facts)
            facts.note_body(body)
            if self._redact is not None:
                facts.prompt_text = self._redact("\n".join(texts_of(body))[:CONTENT_LIMIT])
            # INVARIANT 6: who asked and the decision are committed before the upstream call;
            # a trail that cannot commit them refuses the call (503), and nothing is forwarded.
            await self._audit.commit(*self._before_forwarding(facts))
            facts.forwarded = True
            upstream_body = self._upstream_body(body, route, facts.caller)
            traceparent = upstream_traceparent(facts, self._new_trace_flags)
            if facts.stream:
                await self._relay_stream(request, send, route, endpoint, upstream_body, facts, traceparent)
                return
            answer = await route.provider.complete(endpoint, upstream_body, traceparent=traceparent)
            await self._still_valid(facts)
            facts.completion = hashlib.sha256(answer)
            if self._redact is not None:
                facts.completion_text = self._redact(_answer_text(answer)[:CONTENT_LIMIT])
            answer = self._inspect_answer(answer, facts)
            # INVARIANT: the model record is committed before the caller gets the answer;
            # if the trail cannot commit it, the caller gets a 503 instead.
            await self._audit.commit(*self._finish(facts, 200))
        except UpstreamRejected as rejected:
            try:
                await self._still_valid(facts)  # its body may echo the prompt: not to a caller whose token died
            except IdgateError as error:
                await self._refuse(send, facts, error)
                return
            facts.error_code = "upstream_rejected"
            await self._commit_quietly(self._finish(facts, rejected.status))
            await send_bytes(send, rejected.status, rejected.body, request.id, extra=rejected.headers)
            return
        except IdgateError as error:
            await self._refuse(send, facts, error)
            return
        except Exception as exc:  # a bug is a refusal in OpenAI's shape, on record
            if facts.first_byte_ms is not None:  # a stream has started: nothing more can be said
                self._audit_quietly(self._finish(facts, facts.status or 200))
                raise
            await self._refuse(send, facts, _internal(exc, facts))
            return
        await send_bytes(send, 200, answer, request.id)

    def _route(self, body: dict[str, Any], kind: str, facts: RequestFacts) -> Route:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise BadRequest("`model` must be a non-empty string")
        facts.model = name
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("`stream` must be true or false")
        if stream and kind != "chat":
            raise BadRequest(f"`stream` is not supported for {kind} requests; leave it out or set it to false")
        facts.stream = stream
        route = self._routes.get(name)
        if route is None or route.model.kind != kind:
            article = "an" if kind[0] in "aeiou" else "a"
            raise UnknownModel(f"model `{shown(name)}` does not exist or is not {article} {kind} model")
        facts.provider, facts.upstream_model = route.provider.name, route.model.target
        return route

    def _admit(self, caller: Caller, route: Route, body: dict[str, Any], request: Request, facts: RequestFacts) -> None:
        try:
            admitted = self._admission.admit(caller, route.model.name, body, request.header(DATA_CLASS_HEADER))
        except Refused as refused:
            self._note(refused.admitted, facts)
            raise
        self._note(admitted, facts)
        facts.admitted = admitted

    @staticmethod
    def _note(admitted: Admitted, facts: RequestFacts) -> None:
        facts.decision = admitted.decision
        facts.data_class = admitted.data_class
        facts.findings = admitted.classification.record()["findings"]
        if admitted.tools_offered:
            facts.tools_offered, facts.tools_removed = admitted.tools_offered, admitted.tools_removed
            facts.tool_decisions = admitted.tool_decisions

    def _inspect_answer(self, answer: bytes, facts: RequestFacts) -> bytes:
        """Usage for the record; `tool_calls` for tools the caller may not use are flagged."""
        try:
            parsed = orjson.loads(answer)
        except orjson.JSONDecodeError:
            return answer
        if not isinstance(parsed, dict):
            return answer
        usage = parsed.get("usage")
        facts.usage = usage if isinstance(usage, dict) else None
        if facts.admitted is None or "choices" not in parsed:
            return answer
        flagged = Admission.flagged_tool_calls(parsed, facts.admitted)
        if not flagged:
            return answer
        facts.tool_calls_flagged = flagged
        parsed["idgate"] = {"flagged_tool_calls": flagged}
        return orjson.dumps(parsed)

    def _upstream_body(self, body: dict[str, Any], route: Route, caller: Caller) -> dict[str, Any]:
        upstream = dict(body)
        upstream["model"] = route.model.target
        field = route.provider.identity_field
        if field is not None:
            # The only trace of the caller upstream; a client-supplied value is overwritten.
            upstream[field] = self._pseudonyms.of(caller.subject)
        return upstream

    async def _relay_stream(
        self,
        request: Request,
        send: Send,
        route: Route,
        endpoint: Endpoint,
        body: dict[str, Any],
        facts: RequestFacts,
        traceparent: str,
    ) -> None:
        chunks = route.provider.stream(endpoint, body, traceparent=traceparent)
        try:
            first = await anext(chunks)  # upstream errors surface here, before any byte is sent
        except StopAsyncIteration:
            first = b""
        except BaseException:
            await chunks.aclose()
            raise
        facts.first_byte_ms = round((time.perf_counter() - facts.started_mono) * 1000, 3)
        try:
            await self._still_valid(facts)  # the first byte may have taken minutes
        except BaseException:
            await chunks.aclose()
            raise
        headers = [*_SSE_HEADERS, (b"x-request-id", facts.request_id.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        facts.status = 200
        # The server does not tell a writer that its reader left (uvicorn drops the bytes
        # silently), so a watcher task listens for the disconnect and cancels this task: a
        # caller who leaves stops the upstream generation, instead of the gateway paying for
        # it to the end. why: relaying here, in the request's own task, rather than in a
        # second task awaited with `asyncio.wait`, saves a task and a wait on every stream.
        relay = asyncio.current_task()
        assert relay is not None, "streams are relayed inside the server's request task"
        watcher = asyncio.get_running_loop().create_task(_cancel_when_gone(request.receive, relay))
        try:
            tail = await self._pump(send, first, chunks, facts)
            if _DONE not in tail:
                error = UpstreamError(f"upstream `{route.provider.name}` ended the stream early")
                facts.error_code, facts.error = error.code, error.message
                await send({"type": "http.response.body", "body": _error_event(error, facts), "more_body": True})
            # The whole answer is out: a caller leaving now (clients hang up on an error event)
            # changes nothing, so stop watching before the commit's await can be cancelled.
            watcher.cancel()
            # The model record is committed before the response completes: a caller who has
            # the whole answer can find its record.
            await self._commit_quietly(self._finish(facts, 200))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Ours to handle only if the caller left and nothing else (a shutdown) cancelled us too.
            if not _client_left(watcher) or relay.uncancel() > 0:
                raise
            facts.error_code, facts.error = "client_disconnected", "the client went away before the stream ended"
            self._audit_quietly(self._finish(facts, 200))
        finally:
            watcher.cancel()

    async def _pump(self, send: Send, first: bytes, chunks: AsyncGenerator[bytes, None], facts: RequestFacts) -> bytes:
        """Relay chunks as they come; returns the stream's last bytes (to spot `[DONE]`)."""
        tail = b""
        chunk = first
        calls = _ToolCallScan()
        digest = facts.completion = hashlib.sha256()
        kept = bytearray() if self._redact is not None else None  # the stream, for `audit.record_content`
        try:
            while True:
                if chunk:
                    if self._recheck_due(facts):
                        try:
                            await self._still_valid(facts)
                        except IdgateError as lapsed:
                            return await self._end_lapsed(send, lapsed, facts)
                    if kept is not None and len(kept) < _STREAM_KEPT:
                        kept += chunk
                    if b'"usage"' in chunk:
                        facts.usage = _stream_usage(tail + chunk) or facts.usage
                    names = calls.feed(chunk)
                    if names:
                        self._flag_streamed_calls(names, facts)
                    # why: a chunk of 64 bytes or more holds the whole tail; no need to copy it
                    tail = chunk[-64:] if len(chunk) >= 64 else (tail + chunk)[-64:]
                    digest.update(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return tail
        except Exception as exc:  # noqa: BLE001 - an upstream failure, or a bug: the stream ends with an error event
            error = exc if isinstance(exc, IdgateError) else _internal(exc, facts)
            facts.error_code, facts.error = error.code, error.message
            await send({"type": "http.response.body", "body": _error_event(error, facts), "more_body": True})
            return _DONE  # the error event ends the stream
        finally:
            if kept is not None and self._redact is not None:
                facts.completion_text = self._redact(_streamed_text(bytes(kept))[:CONTENT_LIMIT])
            await chunks.aclose()

    def _recheck_due(self, facts: RequestFacts) -> bool:
        """Whether the caller's credential must be asked again: this process took a revocation in since it last was
        (an int compare: at once), or `RECHECK_SECONDS` have passed (expiry, a view gone stale, other replicas)."""
        return self._gate.changes != facts.standing or time.perf_counter() >= facts.recheck_at

    async def _still_valid(self, facts: RequestFacts) -> None:
        """Before an answer (or a stream's next chunk) goes out: raise why the caller's credential lapsed since it
        was let in, if it did; asked in full only when `_recheck_due`."""
        caller = facts.caller
        assert caller is not None
        if not self._recheck_due(facts):
            return
        standing = self._gate.changes
        lapsed = await self._gate.lapsed(caller, time.time())
        if lapsed is not None:
            raise lapsed
        facts.standing, facts.recheck_at = standing, time.perf_counter() + RECHECK_SECONDS

    @staticmethod
    async def _end_lapsed(send: Send, lapsed: IdgateError, facts: RequestFacts) -> bytes:
        """The caller's credential lapsed mid-stream (expired, revoked, its task or session ended): an error event
        ends the stream, nothing more is relayed, and the record says why."""
        facts.error_code, facts.error = lapsed.code, lapsed.message
        await send({"type": "http.response.body", "body": _error_event(lapsed, facts), "more_body": True})
        return _DONE  # the error event ends the stream

    @staticmethod
    def _flag_streamed_calls(names: list[str], facts: RequestFacts) -> None:
        """A streamed tool call for a tool the caller may not use is flagged in the record."""
        if facts.admitted is None:
            return
        flagged = [n for n in names if n not in facts.admitted.allowed_tools]
        if flagged:
            facts.tool_calls_flagged = (facts.tool_calls_flagged or []) + flagged

    # -- endings -------------------------------------------------------------------

    @staticmethod
    def _before_forwarding(facts: RequestFacts) -> list[dict[str, Any]]:
        return _with_decisions([identity_record(facts, ended=False)], facts)

    def _finish(self, facts: RequestFacts, status: int) -> list[dict[str, Any]]:
        """The request's last records: its model record if it was forwarded, else who asked (and the decision)."""
        facts.status = status
        if facts.forwarded:
            return [model_record(facts)]
        return _with_decisions([identity_record(facts, ended=True)], facts)

    def _emit(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._audit.emit(record)

    def _audit_quietly(self, records: list[dict[str, Any]]) -> None:
        """Record after the answer went out; a failing store shows on the next request."""
        with contextlib.suppress(IdgateError):
            self._emit(records)

    async def _commit_quietly(self, records: list[dict[str, Any]]) -> None:
        """Commit before the response completes; when the trail cannot, the answer still goes (it is a refusal,
        or it is under way), and the failing store refuses the next request."""
        with contextlib.suppress(IdgateError):
            await self._audit.commit(*records)

    async def _refuse(self, send: Send, facts: RequestFacts, error: IdgateError) -> None:
        facts.error_code, facts.error = error.code, error.message
        decision_id = facts.decision.id if facts.decision is not None and not facts.decision.allowed else None
        await self._commit_quietly(self._finish(facts, error.status))
        await send_error(send, error, facts.request_id, decision_id)


def _with_decisions(records: list[dict[str, Any]], facts: RequestFacts) -> list[dict[str, Any]]:
    """`records` and the request's decisions: the model's first, then one per function tool offered."""
    decided = decision_record(facts)
    if decided is not None:
        records.append(decided)
        if facts.tool_decisions:
            records.extend(tool_decision_records(facts))
    return records


def _facts(request: Request) -> RequestFacts:
    """A request's facts, in the caller's trace if it sent a valid W3C `traceparent`."""
    parent = trace_context(request.header(b"traceparent"))
    if parent is None:
        return RequestFacts(request.id, request.method, request.path)
    trace, span, flags = parent
    return RequestFacts(request.id, request.method, request.path, trace_id=trace, parent_span=span, trace_flags=flags)


def _stream_usage(data: bytes) -> dict[str, Any] | None:
    for line in reversed(data.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                usage = orjson.loads(line[6:]).get("usage")
            except orjson.JSONDecodeError:
                continue
            if isinstance(usage, dict):
                return usage
    return None


def _internal(exc: Exception, facts: RequestFacts) -> IdgateError:
    """An unexpected exception: logged in full here, told to the caller only as a request id."""
    log.error("request %s failed: %s", facts.request_id, type(exc).__name__, exc_info=exc)
    return IdgateError(f"the gateway failed on this request; it is logged as `{facts.request_id}`")


async def _cancel_when_gone(receive: Receive, relay: asyncio.Task[Any]) -> None:
    """Cancels `relay` when the client has gone (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    relay.cancel()


def _client_left(watcher: asyncio.Task[None]) -> bool:
    """Whether `watcher` (`_cancel_when_gone`) saw the client leave, and so cancelled the relay."""
    return watcher.done() and not watcher.cancelled() and watcher.exception() is None


class _ToolCallScan:
    """Tool-call names in a chat stream, from whole SSE events only (events can span chunks)."""

    LIMIT = 1 << 20  # an event longer than this is not waited for

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        """Names in the events this chunk completes; the unfinished event waits for the next chunk."""
        data = self.pending + chunk if self.pending else chunk
        events, _, rest = data.rpartition(b"\n\n")
        self.pending = rest if len(rest) <= self.LIMIT else b""
        names: list[str] = []
        if b'"tool_calls"' not in events:  # why: plain text streams pay one substring test per chunk
            return names
        for line in events.split(b"\n"):
            if not line.startswith(b"data: {") or b'"tool_calls"' not in line:
                continue
            try:
                event = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                continue
            for choice in event.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                for call in (delta or {}).get("tool_calls") or ():
                    function = call.get("function") if isinstance(call, dict) else None
                    name = function.get("name") if isinstance(function, dict) else None
                    if isinstance(name, str):
                        names.append(name)
        return names


def _error_event(error: IdgateError, facts: RequestFacts) -> bytes:
    return b"data: " + orjson.dumps(error_payload(error, facts.request_id)) + b"\n\n"


def _answer_text(answer: bytes) -> str:
    """The text of a chat completion's choices (empty for anything else)."""
    try:
        value = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return ""
    choices = value.get("choices") if isinstance(value, dict) else None
    texts = [
        choice["message"]["content"]
        for choice in choices or ()
        if isinstance(choice, dict)
        and isinstance(choice.get("message"), dict)
        and isinstance(choice["message"].get("content"), str)
    ]
    return "\n".join(texts)


def _streamed_text(stream: bytes) -> str:
    """The text of a chat completion stream: its events' `delta.content`, in order."""
    texts: list[str] = []
    for line in stream.splitlines():
        if not line.startswith(b"data:") or line.strip() == _DONE:
            continue
        try:
            event = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            continue  # an event cut by the size bound, or not JSON
        for choice in (event.get("choices") if isinstance(event, dict) else None) or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                texts.append(delta["content"])
    return "".join(texts)
