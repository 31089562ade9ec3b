"""Audit record shapes: versioned, self-describing, never holding a secret."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from idgate.identity.principal import Caller
from idgate.policy.decision import Decision

__all__ = ["RequestFacts", "exchange_record", "request_record"]

REQUEST_RECORD_VERSION = 1


@dataclass(slots=True)
class RequestFacts:
    """What the pipeline learns about one request, stage by stage."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.perf_counter)
    caller: Caller | None = None
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    decision: Decision | None = None
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
    admitted: Any = None  # what admission decided (idgate.proxy.admission.Admitted)


def _caller(caller: Caller | None) -> dict[str, Any]:
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


def request_record(facts: RequestFacts) -> dict[str, Any]:
    """The one record of a request: who, what, how it ended."""
    decision = facts.decision
    outcome = (
        "ok"
        if 200 <= facts.status < 300 and facts.error_code is None
        else "refused"
        if 400 <= facts.status < 500
        else "error"
    )
    return {
        "kind": "request",
        "version": REQUEST_RECORD_VERSION,
        "request_id": facts.request_id,
        "time": facts.started,
        "method": facts.method,
        "path": facts.path,
        **_caller(facts.caller),
        "model": facts.model,
        "provider": facts.provider,
        "upstream_model": facts.upstream_model,
        "stream": facts.stream,
        "decision": None
        if decision is None
        else {
            "id": decision.id,
            "allowed": decision.allowed,
            "policies": list(decision.policies),
            "reason": decision.reason,
            "errors": list(decision.errors),
            "revision": decision.revision,
            "denied_for": decision.denied_for or None,
        },
        "data_class": facts.data_class,
        "findings": facts.findings,
        "tools_offered": facts.tools_offered,
        "tools_removed": facts.tools_removed,
        "tool_calls_flagged": facts.tool_calls_flagged,
        "status": facts.status,
        "outcome": outcome,
        "error": None if facts.error_code is None else {"code": facts.error_code, "message": facts.error},
        "latency_ms": round((time.perf_counter() - facts.started_mono) * 1000, 3),
        "first_byte_ms": facts.first_byte_ms,
        "usage": facts.usage,
    }


EXCHANGE_RECORD_VERSION = 1


def exchange_record(
    request_id: str,
    *,
    status: int,
    caller: Caller | None = None,
    claims: dict[str, Any] | None = None,
    decisions: tuple[Decision, ...] = (),
    error: str | None = None,
) -> dict[str, Any]:
    """A token exchange: who got which token (its id, audience, scope, lifetime), never the token."""
    issued = None
    if claims is not None:
        issued = {k: claims.get(k) for k in ("jti", "aud", "scope", "exp", "task")}
    return {
        "kind": "token_exchange",
        "version": EXCHANGE_RECORD_VERSION,
        "request_id": request_id,
        "time": time.time(),
        **_caller(caller),
        "issued": issued,
        "decisions": [
            {"id": d.id, "allowed": d.allowed, "policies": list(d.policies), "reason": d.reason, "revision": d.revision}
            for d in decisions
        ],
        "status": status,
        "outcome": "ok" if status == 200 else "refused" if status < 500 else "error",
        "error": None if error is None else {"code": error},
    }
