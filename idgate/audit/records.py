"""Audit record shapes: versioned, self-describing, linked, never holding a secret.

One request leaves several records, each of one `kind`, each carrying the
schema version `v`, the gateway's `request_id` and the W3C `trace_id` (the
caller's, from a valid `traceparent` header, else a new one), so that one
request's story can be put back together, and joined to the caller's traces:

- `identity`: who called: the subject (kind, id, tenant, issuer, groups), the
  actor chain (outermost first) and the credential (kind, id/`jti`, issuer,
  binding, expiry, task), never the token. An unauthenticated call has
  `subject: null` and its refusal in `error`.
- `decision`: one policy decision: action, resource, the context the policy
  saw (data class, tenant, tools, task) and the detector findings behind the data
  class (names and counts), allowed or not, the reason category, the
  policies that decided it, errors and the policy set's revision hash. A chat
  request has one for its model and, after it, one per function tool it offers
  (`call_tool` on `functions/NAME`, `tool_decision_records`), all committed
  together before the upstream call.
- `model`: a call to a model: provider, model, upstream model, the request's
  parameters (no content), tools offered/removed/flagged, data class and
  detector findings (names and counts, never the matched text), SHA-256 of the
  prompt and of the completion, usage, latency, time to first byte, outcome,
  and `upstream_span`: the span id the upstream was given as its parent.
- `action`: anything done for a request or by the gateway itself: a tool call,
  a token issued, a task started or completed, a revocation, a policy reload,
  a configuration load (`action_record`).
- `token_exchange`: a token exchange at `/oauth2/token` (`exchange_record`).

Where a request ended: the `model` record has its HTTP `status`, `outcome`,
`error` and `latency_ms` when the request reached a model; otherwise (refused
or answered by the gateway itself) the `identity` record has them, and is
then written when the request ended. `story()` merges one request's records
into one flat view (what `idgate audit query` lists).

Trace context upstream: every upstream call (model provider, MCP tool server)
carries `traceparent: 00-<trace_id>-<span>-<flags>` (`upstream_traceparent`).
The span is the request's own span, the one the OTLP export emits
(`export.request_span_id`): a request makes one upstream call, so the
provider's server span is a child of the gateway's request span and a tracing
backend joins them with no span of ours missing. The flags are the caller's
(only the bits W3C defines, `sampled` and `random`; the others must be zero);
for a trace the gateway started, `01` when the OTLP export records it, else
`00`. A caller's `tracestate` and `baggage` are never relayed: they are opaque
vendor and application data (user ids, tenant names, session keys) that the
gateway cannot vet, and a provider or tool server is across a trust boundary.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from idgate.audit.export import request_span_id
from idgate.identity.principal import Caller
from idgate.ids import random_hex
from idgate.policy.decision import Decision

__all__ = [
    "ACTIONS",
    "KINDS",
    "RECORD_VERSION",
    "RequestFacts",
    "action_record",
    "decision_of",
    "decision_record",
    "exchange_record",
    "identity_record",
    "model_record",
    "new_trace_id",
    "parse_traceparent",
    "policy_reload_record",
    "prompt_digest",
    "stories",
    "story",
    "tool_decision_records",
    "trace_context",
    "upstream_traceparent",
]

RECORD_VERSION = 1
KINDS = ("identity", "decision", "model", "action", "token_exchange")
ACTIONS = (
    "tool_call",
    "token_issued",
    "task_started",
    "task_completed",
    "revocation",
    "policy_reload",
    "config_loaded",
    "unrecorded_reads",
    "tool_pinned",
    "tool_changed",
    "list_filtered",
)

# The request parameters a model record keeps: settings, never content (no `messages`,
# `input`, `stop` strings, `user`, or tool definitions).
_PARAMETERS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "reasoning_effort",
    "parallel_tool_calls",
    "dimensions",
    "encoding_format",
    "logprobs",
    "top_logprobs",
)

_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16


def trace_context(header: bytes | None) -> tuple[str, str, str] | None:
    """The (trace id, parent span id, trace flags) of a valid W3C `traceparent` header, else None.

    Per W3C Trace Context: version `ff` is invalid; version `00` has exactly four
    fields; a later version may carry more after a dash; all-zero ids are invalid.
    The flags keep only the bits W3C defines (`01` sampled, `02` random trace id):
    the others "MUST be set to zero" by whoever passes them on.
    """
    if header is None or len(header) < 55:
        return None
    match = _TRACEPARENT.match(header.strip())
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest) or trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    return trace.decode(), span.decode(), _FLAGS[int(flags, 16) & 0x03]


_FLAGS = ("00", "01", "02", "03")


def parse_traceparent(header: bytes | None) -> tuple[str, str] | None:
    """The (trace id, parent span id) of a valid W3C `traceparent` header, else None (see `trace_context`)."""
    context = trace_context(header)
    return None if context is None else (context[0], context[1])


def upstream_traceparent(facts: RequestFacts, new_trace_flags: str) -> str:
    """The `traceparent` an upstream call of this request carries; notes its span in `facts.upstream_span`.

    `new_trace_flags`: the flags when the caller sent no valid `traceparent` (the gateway started
    the trace): `01` if the gateway records it (an OTLP export), else `00`.
    """
    span = facts.upstream_span = request_span_id(facts.request_id).hex()
    return f"00-{facts.trace_id}-{span}-{facts.trace_flags or new_trace_flags}"


def new_trace_id() -> str:
    """A random W3C trace id: 32 lowercase hex digits."""
    return random_hex(16)


def prompt_digest(body: Mapping[str, Any]) -> str | None:
    """SHA-256 (hex) of what the model is asked: a chat's `messages` or an embedding's `input`, sorted-key JSON."""
    content = body.get("messages", body.get("input"))
    if content is None:
        return None
    try:
        data = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    return hashlib.sha256(data).hexdigest()


@dataclass(slots=True)
class RequestFacts:
    """What the pipeline learns about one request, stage by stage."""

    request_id: str
    method: str
    path: str
    trace_id: str = ""
    parent_span: str | None = None  # the caller's span, from its `traceparent`
    trace_flags: str | None = None  # the caller's trace flags, from its `traceparent`
    upstream_span: str | None = None  # the span id an upstream call was given as its parent
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.perf_counter)
    caller: Caller | None = None
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    decision: Decision | None = None
    tool_decisions: Sequence[tuple[str, Decision]] = ()  # (tool `server/name`, decision) per function tool
    action: str = "invoke_model"
    status: int = 0
    error_code: str | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None
    first_byte_ms: float | None = None
    data_class: str | None = None
    findings: list[dict[str, Any]] | None = None
    tools_offered: list[str] | None = None
    tools_removed: list[str] | None = None
    tool_calls_flagged: list[str] | None = None
    parameters: dict[str, Any] | None = None
    prompt_sha256: str | None = None
    completion: Any = None  # a hashlib sha256 object fed with the answer's bytes as relayed
    prompt_text: str | None = None  # only with `audit.record_content`, redacted by the detectors
    completion_text: str | None = None  # likewise
    forwarded: bool = False  # the identity and decision records are committed; the call went upstream
    admitted: Any = None  # what admission decided (idgate.proxy.admission.Admitted)
    standing: int = 0  # `Gate.changes` when the caller was let in: a stream asks again once it moved
    recheck_at: float = 0.0  # `perf_counter` time when the caller's credential is next asked again in full

    def __post_init__(self) -> None:
        if not self.trace_id:
            self.trace_id = new_trace_id()

    def note_body(self, body: Mapping[str, Any]) -> None:
        """Keep the request's parameters and the prompt's hash (never its content)."""
        self.parameters = {k: body[k] for k in _PARAMETERS if k in body and _scalar(body[k])} or None
        self.prompt_sha256 = prompt_digest(body)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 64)


def _who(caller: Caller | None) -> dict[str, Any]:
    if caller is None:
        return {"subject": None, "actors": [], "credential": None}
    s, c = caller.subject, caller.credential
    return {
        "subject": {"kind": s.kind, "id": s.id, "tenant": s.tenant, "issuer": s.issuer, "groups": list(s.groups)},
        "actors": [{"id": a.id, "kind": a.kind, "issuer": a.issuer} for a in caller.actors],
        "credential": {
            "kind": c.kind,
            "id": c.id,
            "issuer": c.issuer_name,
            "expires_at": c.expires_at,
            "binding": c.binding,
            "task": c.task,
        },
    }


def _outcome(status: int, error_code: str | None) -> str:
    if 200 <= status < 300 and error_code is None:
        return "ok"
    return "refused" if 400 <= status < 500 else "error"


def _ending(facts: RequestFacts) -> dict[str, Any]:
    return {
        "status": facts.status,
        "outcome": _outcome(facts.status, facts.error_code),
        "error": None if facts.error_code is None else {"code": facts.error_code, "message": facts.error},
        "latency_ms": round((time.perf_counter() - facts.started_mono) * 1000, 3),
    }


def _base(kind: str, request_id: str, trace_id: str, when: float) -> dict[str, Any]:
    return {"kind": kind, "v": RECORD_VERSION, "request_id": request_id, "trace_id": trace_id, "time": when}


def identity_record(facts: RequestFacts, *, ended: bool) -> dict[str, Any]:
    """Who made the request; with `ended`, also how the request ended (it did not reach a model)."""
    record = _base("identity", facts.request_id, facts.trace_id, facts.started)
    record["method"] = facts.method
    record["path"] = facts.path
    if facts.parent_span is not None:
        record["parent_span"] = facts.parent_span
    record.update(_who(facts.caller))
    if ended:
        record.update(_ending(facts))
    return record


def decision_record(facts: RequestFacts) -> dict[str, Any] | None:
    """The policy decision on the request's model (None if policy was not asked)."""
    decision = facts.decision
    if decision is None:
        return None
    extra = {"tools": facts.tools_offered} if facts.tools_offered else {}
    resource = {"type": "model", "id": facts.model}
    record = decision_of(facts, facts.action, resource, facts.data_class, decision, extra, facts.tools_removed)
    record["findings"] = facts.findings
    return record


def tool_decision_records(facts: RequestFacts) -> list[dict[str, Any]]:
    """One `decision` record per function tool the request offered (`call_tool` on `SERVER/NAME`)."""
    return [
        decision_of(
            facts,
            "call_tool",
            {"type": "tool", "id": tool},
            facts.data_class,
            decision,
            {"tool": tool.rsplit("/", 1)[-1]},
        )
        for tool, decision in facts.tool_decisions
    ]


def decision_of(
    facts: RequestFacts,
    action: str,
    resource: Mapping[str, Any],
    data_class: str | None,
    decision: Decision,
    extra_context: Mapping[str, Any] | None = None,
    tools_removed: Any = None,
) -> dict[str, Any]:
    """A `decision` record: the policy's answer for the request's caller on `resource` (a model, a tool)."""
    caller = facts.caller
    context: dict[str, Any] = {"data_class": data_class, "tenant": caller.subject.tenant if caller else None}
    context.update(extra_context or {})
    if caller is not None and caller.credential.task:
        context["task"] = caller.credential.task
    record = _base("decision", facts.request_id, facts.trace_id, time.time())
    record.update(
        {
            "subject": None if caller is None else {"id": caller.subject.id, "tenant": caller.subject.tenant},
            "action": action,
            "resource": dict(resource),
            "context": context,
            "decision_id": decision.id,
            "allowed": decision.allowed,
            "reason": decision.reason,
            "policies": list(decision.policies),
            "errors": list(decision.errors),
            "revision": decision.revision,
            "denied_for": decision.denied_for or None,
            "tools_removed": tools_removed,
        }
    )
    return record


def model_record(facts: RequestFacts) -> dict[str, Any]:
    """The call to the model: what was sent (settings and hashes, not content) and how it went."""
    record = _base("model", facts.request_id, facts.trace_id, time.time())
    caller = facts.caller
    record.update(
        {
            "subject": None if caller is None else {"id": caller.subject.id, "tenant": caller.subject.tenant},
            "provider": facts.provider,
            "model": facts.model,
            "upstream_model": facts.upstream_model,
            "stream": facts.stream,
            "parameters": facts.parameters,
            "tools_offered": facts.tools_offered,
            "tools_removed": facts.tools_removed,
            "tool_calls_flagged": facts.tool_calls_flagged,
            "data_class": facts.data_class,
            "findings": facts.findings,
            "prompt_sha256": facts.prompt_sha256,
            "completion_sha256": None if facts.completion is None else facts.completion.hexdigest(),
            "usage": facts.usage,
            "first_byte_ms": facts.first_byte_ms,
            "upstream_span": facts.upstream_span,
            **_ending(facts),
        }
    )
    if facts.prompt_text is not None or facts.completion_text is not None:  # `audit.record_content` only
        record["prompt"] = facts.prompt_text
        record["completion"] = facts.completion_text
    return record


def action_record(
    request_id: str,
    trace_id: str | None,
    caller: Caller | None,
    action: str,
    target: str | None,
    outcome: str,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One action taken for a request, or by the gateway on its own (then `request_id` names the occasion).

    `action` is one of `ACTIONS` (e.g. "tool_call", "token_issued", "task_started",
    "task_completed", "revocation", "policy_reload", "config_loaded"); `target` what it
    acted on (a tool `server/name`, a token's `jti`, a task id, a file); `outcome` e.g.
    "ok", "refused", "error"; `details` plain JSON values, never a token or secret (for a
    tool call: `arguments_sha256`, the downstream credential's `credential_id` and `audience`).
    Hand it to `AuditWriter.emit` (or `await AuditWriter.commit`).
    """
    record = _base("action", request_id, trace_id or new_trace_id(), time.time())
    record.update(_who(caller))
    record.update({"action": action, "target": target, "outcome": outcome, "details": dict(details or {})})
    return record


def policy_reload_record(revision: str, changed: bool, problems: tuple[str, ...] = ()) -> dict[str, Any]:
    """A policy reload: the revision now in force, and whether the files were taken or refused."""
    outcome = "refused" if problems else "ok" if changed else "unchanged"
    details = {"revision": revision, "changed": changed, "problems": list(problems)}
    return action_record(f"reload-{int(time.time() * 1000)}", None, None, "policy_reload", "policy", outcome, details)


def exchange_record(
    request_id: str,
    *,
    status: int,
    caller: Caller | None = None,
    claims: dict[str, Any] | None = None,
    decisions: tuple[Decision, ...] = (),
    error: str | None = None,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """A token exchange: who got which token (its id, audience, scope, lifetime), never the token."""
    issued = None
    if claims is not None:
        issued = {k: claims.get(k) for k in ("jti", "aud", "scope", "exp", "task")}
    record = _base("token_exchange", request_id, trace_id or new_trace_id(), time.time())
    record.update(_who(caller))
    record.update(
        {
            "issued": issued,
            "decisions": [
                {
                    "id": d.id,
                    "allowed": d.allowed,
                    "policies": list(d.policies),
                    "reason": d.reason,
                    "revision": d.revision,
                }
                for d in decisions
            ],
            "status": status,
            "outcome": "ok" if status == 200 else "refused" if status < 500 else "error",
            "error": None if error is None else {"code": error},
        }
    )
    return record


# -- one request's records, merged ------------------------------------------------------------

_IDENTITY_FIELDS = ("method", "path", "subject", "actors", "credential", "parent_span")
_MODEL_FIELDS = (
    "provider",
    "model",
    "upstream_model",
    "stream",
    "parameters",
    "tools_offered",
    "tools_removed",
    "tool_calls_flagged",
    "data_class",
    "findings",
    "prompt_sha256",
    "completion_sha256",
    "prompt",
    "completion",
    "usage",
    "first_byte_ms",
    "upstream_span",
)
_ENDING_FIELDS = ("status", "outcome", "error", "latency_ms")


def story(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One request's records (oldest first) as one flat view: who, the decision, the model call, the actions.

    Keys: request_id, trace_id, time, method, path, subject, actors, credential,
    decision (id, allowed, reason, policies, errors, revision, denied_for, action,
    resource, context) or None, decisions (all of them), model, provider, ...,
    status, outcome, error, latency_ms, actions, kinds (the record kinds seen).
    """
    view: dict[str, Any] = {"decision": None, "decisions": [], "actions": [], "kinds": []}
    for record in records:
        kind = record.get("kind")
        view["kinds"].append(kind)
        view.setdefault("request_id", record.get("request_id"))
        view.setdefault("trace_id", record.get("trace_id"))
        view.setdefault("time", record.get("time"))
        if kind == "identity":
            view["time"] = record.get("time")
            for name in _IDENTITY_FIELDS:
                if name in record:
                    view[name] = record[name]
            if "status" in record:
                for name in _ENDING_FIELDS:
                    view[name] = record.get(name)
        elif kind == "decision":
            verdict = {
                "id": record.get("decision_id"),
                "allowed": record.get("allowed"),
                "reason": record.get("reason"),
                "policies": record.get("policies"),
                "errors": record.get("errors"),
                "revision": record.get("revision"),
                "denied_for": record.get("denied_for"),
                "action": record.get("action"),
                "resource": record.get("resource"),
                "context": record.get("context"),
            }
            view["decisions"].append(verdict)
            if view["decision"] is None:
                view["decision"] = verdict
                context = record.get("context") or {}
                view.setdefault("data_class", context.get("data_class"))
                resource = record.get("resource") or {}
                if resource.get("type") == "model":  # an MCP request's first decision is on a tool
                    view.setdefault("model", resource.get("id"))
                for name in ("tools_removed", "findings"):
                    if record.get(name) is not None:
                        view.setdefault(name, record.get(name))
                if context.get("tools"):
                    view.setdefault("tools_offered", context["tools"])
        elif kind == "model":
            for name in (*_MODEL_FIELDS, *_ENDING_FIELDS):
                if name in record:
                    view[name] = record[name]
        elif kind == "action":
            view["actions"].append({k: record.get(k) for k in ("action", "target", "outcome", "details", "time")})
        else:  # a kind this version does not merge: keep its fields, without overriding
            for name, value in record.items():
                view.setdefault(name, value)
    return view


def stories(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each request's records merged by `story`, in order of the request's first record.

    A story is a request with an `identity` record, or actions taken for a caller (a
    task started at `/tasks`). Token exchanges are kept as they are, in place; the
    gateway's own actions for nobody (configuration loaded, policy reloaded) belong to
    no story and are left out.
    """
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    order: list[str | dict[str, Any]] = []
    for record in records:
        if record.get("kind") in ("identity", "decision", "model", "action"):
            request_id = str(record.get("request_id"))
            if request_id not in grouped:
                grouped[request_id] = []
                order.append(request_id)
            grouped[request_id].append(record)
        else:
            order.append(dict(record))
    found: list[dict[str, Any]] = []
    for item in order:
        if isinstance(item, dict):
            found.append(item)
        elif any(r.get("kind") == "identity" or r.get("subject") for r in grouped[item]):
            found.append(story(grouped[item]))
    return found
