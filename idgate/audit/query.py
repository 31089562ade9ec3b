"""Ask the audit trail: find requests by who, for whom, what and when; tell one request's story.

A request's records (identity, decision, model, actions: `idgate.audit.records`)
are merged into one view (`story`). `query(trail, ...)` finds requests by their
identity record, newest first: by time and subject id in the store (indexed
columns), by everything else on the merged view. `explain(trail, request_id)`
says, in plain sentences, who made one request, on whose behalf, with what
credential, what was decided and why (every decision: the model's, and each
tool's, kept or removed), which model saw which data class, which actions were
taken with which credentials, and how it ended. Both only read.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from idgate.audit.records import story
from idgate.audit.stores import SqliteStore, Store
from idgate.errors import shown

__all__ = ["TABLE_HEADER", "UnknownRequest", "explain", "format_time", "parse_when", "query", "table_row"]

TABLE_HEADER = ("time", "request", "subject", "agents", "model", "decision", "status")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


class UnknownRequest(LookupError):
    """No request with that id is in the trail."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"no request `{request_id}` in the audit trail")
        self.request_id = request_id


def parse_when(text: str, now: float | None = None) -> float:
    """Epoch seconds for `text`: relative to now (`30m`, `2h`, `7d`, `1w`) or ISO-8601 (UTC if no offset)."""
    relative = _RELATIVE.match(text)
    if relative:
        return (time.time() if now is None else now) - float(relative[1]) * _UNITS[relative[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"`{text}` is not a time: use ISO-8601 (2026-11-24T09:00:00Z) or an age like 30m, 2h, 7d, 1w"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_time(epoch: float) -> str:
    """`2026-11-24T09:00:00Z`: UTC, to the second."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _store(trail: Path | Store) -> Store:
    return SqliteStore(trail) if isinstance(trail, Path) else trail


def _rows(store: Store, since: float, until: float, subject: str | None) -> Iterator[dict[str, Any]]:
    """Each request's story whose identity record is in [since, until] (of `subject`, if given), newest first."""
    for record in store.records(since, until, subject, ("identity",)):
        yield story(store.request_records(record["request_id"]))


def _epoch(value: str | float | None, default: float) -> float:
    if value is None:
        return default
    return float(value) if isinstance(value, int | float) else parse_when(value)


def _tools(record: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for key in ("tools_offered", "tools_removed", "tool_calls_flagged"):
        names.update(record.get(key) or ())
    for action in record.get("actions") or ():
        if action.get("action") == "tool_call" and action.get("target"):
            names.add(str(action["target"]).rsplit("/", 1)[-1])
            names.add(str(action["target"]))
    for verdict in record.get("decisions") or ():
        resource = verdict.get("resource") or {}
        if resource.get("type") == "tool" and resource.get("id"):
            names.add(str(resource["id"]).rsplit("/", 1)[-1])
            names.add(str(resource["id"]))
    return names


def _refused(record: dict[str, Any]) -> bool:
    """Whether policy refused the request: its model, or (`unentitled_tools: refuse`) a tool it offered.

    A tool removed while the request went on to the model is not a refusal of the request:
    `--tool NAME` and `explain` show those.
    """
    verdict = record.get("decision") or {}
    if verdict.get("allowed") is False:
        return True
    forwarded = "model" in (record.get("kinds") or ())
    return not forwarded and any(v.get("allowed") is False for v in (record.get("decisions") or [])[1:])


def _tools_refused(record: dict[str, Any]) -> list[str]:
    """The tools a chat offered that policy refused (the first decision is the model's)."""
    return [
        str((v.get("resource") or {}).get("id"))
        for v in (record.get("decisions") or [])[1:]
        if v.get("allowed") is False
    ]


def _matches(
    record: dict[str, Any],
    *,
    agent: str | None,
    tenant: str | None,
    task: str | None,
    model: str | None,
    tool: str | None,
    decision: str | None,
) -> bool:
    subject = record.get("subject") or {}
    credential = record.get("credential") or {}
    verdict = record.get("decision") or {}
    if decision == "deny":
        decided = _refused(record)
    elif decision == "allow":
        decided = bool(verdict) and not _refused(record)
    else:
        decided = True
    checks = (
        agent is None or any(a.get("id") == agent for a in record.get("actors") or ()),
        tenant is None or subject.get("tenant") == tenant,
        task is None or credential.get("task") == task,
        model is None or record.get("model") == model,
        tool is None or tool in _tools(record),
        decided,
    )
    return all(checks)


def query(
    trail: Path | Store,
    *,
    subject: str | None = None,
    agent: str | None = None,
    tenant: str | None = None,
    task: str | None = None,
    model: str | None = None,
    tool: str | None = None,
    decision: str | None = None,
    since: str | float | None = None,
    until: str | float | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The requests (their records merged by `story`) that match every filter given, newest first, at most `limit`.

    `subject` is the subject's id; `agent` any actor's id in the chain; `tool` a tool
    offered, removed, flagged, decided on or called (`NAME` or `SERVER/NAME`); `decision`
    "deny" for requests policy refused (their model, or a tool they offered when such requests
    are refused), "allow" for those it let through (perhaps with tools removed: see `tool`);
    records without a policy decision, e.g. unauthenticated calls, match neither. `since`/`until` take epoch
    seconds, ISO-8601 or an age like `2h`, `7d`.
    """
    if decision not in (None, "allow", "deny"):
        raise ValueError(f"decision must be `allow` or `deny`, not `{decision}`")
    if limit < 1:
        raise ValueError("limit must be at least 1")
    found: list[dict[str, Any]] = []
    for record in _rows(_store(trail), _epoch(since, float("-inf")), _epoch(until, float("inf")), subject):
        if _matches(record, agent=agent, tenant=tenant, task=task, model=model, tool=tool, decision=decision):
            found.append(record)
            if len(found) >= limit:
                break
    return found


def table_row(record: dict[str, Any]) -> list[str]:
    """One line of `idgate audit query`'s table, in `TABLE_HEADER`'s order."""
    subject = record.get("subject") or {}
    verdict = record.get("decision")
    if verdict is None:
        decided = "-"
    elif verdict.get("allowed") is False:
        decided = "deny" + (f": {verdict['reason']}" if verdict.get("reason") else "")
    else:
        tools = _tools_refused(record)
        if _refused(record):
            decided = f"deny: tool {', '.join(tools)}"
        else:
            decided = "allow" + (f": {verdict['reason']}" if verdict.get("reason") else "")
            if tools:
                decided += f" (removed {', '.join(tools)})"
    who = subject.get("id") or "-"
    if subject.get("tenant"):
        who += f"@{subject['tenant']}"
    cells = [
        format_time(record["time"]),
        record["request_id"],
        who,
        ">".join(a.get("id", "?") for a in record.get("actors") or ()) or "-",
        record.get("model") or "-",
        decided,
        str(record.get("status")),
    ]
    # why: cells hold what callers and issuers chose (ids, tool names): no control characters
    # may reach a reviewer's terminal, nor a newline forge a row.
    return [shown(cell, 400) for cell in cells]


def _who(principal: dict[str, Any]) -> str:
    tenant = f" (tenant {principal['tenant']})" if principal.get("tenant") else ""
    return f"{principal.get('kind') or 'caller'} `{principal.get('id')}`{tenant}"


def _listed(names: list[str] | None) -> str:
    return ", ".join(f"`{n}`" for n in names) if names else "none"


def _sentences(record: dict[str, Any]) -> list[str]:
    when = format_time(record["time"])
    trace = f" (trace `{record['trace_id']}`)" if record.get("trace_id") else ""
    lines = [f"Request `{record['request_id']}`{trace} at {when}: {record.get('method')} {record.get('path')}."]
    subject = record.get("subject")
    if subject is None:
        lines.append("Who: nobody verified; the caller was not authenticated.")
    else:
        groups = f", groups {_listed(subject.get('groups'))}" if subject.get("groups") else ""
        lines.append(f"Who: {_who(subject)}, issued by `{subject.get('issuer')}`{groups}.")
        actors = record.get("actors") or []
        if actors:
            chain = " acting for ".join(
                f"{a.get('kind') or 'agent'} `{a.get('id')}`"
                + (f" (issuer `{a['issuer']}`)" if a.get("issuer") else "")
                for a in actors
            )
            lines.append(f"On whose behalf: {chain} acting for {_who(subject)}.")
        else:
            lines.append(f"On whose behalf: no agent in between; {_who(subject)} called directly.")
    credential = record.get("credential")
    if credential is not None:
        task = f", for task `{credential['task']}`" if credential.get("task") else ", for no task"
        expires = f", expiring {format_time(credential['expires_at'])}" if credential.get("expires_at") else ""
        lines.append(
            f"Credential: {credential.get('kind')} `{credential.get('id')}` from issuer `{credential.get('issuer')}`,"
            f" binding {credential.get('binding') or 'none'}{task}{expires}."
        )
    verdict = record.get("decision")
    decisions = record.get("decisions") or ([verdict] if verdict else [])
    forwarded = "model" in (record.get("kinds") or ())
    if not decisions:
        lines.append("Decision: none was made (the request ended before policy was consulted).")
    for index, one in enumerate(decisions):
        allowed = "allowed" if one.get("allowed") else "refused"
        policies = _listed(one.get("policies"))
        resource = one.get("resource") or {}
        what = f" {one['action']} on {resource.get('type')} `{resource.get('id')}`" if one.get("action") else ""
        if index > 0 and resource.get("type") == "tool" and record.get("tools_offered"):
            # A function tool the chat request offered: kept for the model, or not.
            if one.get("allowed"):
                allowed = (
                    "allowed (offered to the model)"
                    if forwarded
                    else "allowed (but the request was refused for another tool)"
                )
            elif forwarded:
                allowed = "refused (removed before the model saw the request)"
            else:
                allowed = "refused (the request was refused for it)"
        text = f"Decision `{one.get('id')}`{what}: {allowed} (reason: {one.get('reason') or 'none given'});"
        text += f" policies {policies}; policy set revision `{one.get('revision')}`."
        context = one.get("context")
        if context:
            text += " Context: " + ", ".join(f"{k} {v}" for k, v in context.items() if v is not None) + "."
        if one.get("errors"):
            text += f" Errors: {'; '.join(str(e) for e in one['errors'])}."
        if one.get("denied_for"):
            text += f" Denied for: {one['denied_for']}."
        lines.append(text)
    model = record.get("model")
    if model is not None:
        route = f" via provider `{record['provider']}`" if record.get("provider") else ""
        if record.get("upstream_model"):
            route += f" (upstream model `{record['upstream_model']}`)"
        data_class = record.get("data_class") or "unclassified"
        findings = record.get("findings") or []
        found = (
            "; findings: "
            + ", ".join(f"{f.get('detector')} ({f.get('data_class')}) x{f.get('count')}" for f in findings)
            if findings
            else "; no detector findings"
        )
        if verdict is not None and (not verdict.get("allowed") or not forwarded):
            lines.append(
                f"Model: `{model}`{route} was asked for, data class {data_class}{found}; nothing was forwarded."
            )
        else:
            stream = ", streamed" if record.get("stream") else ""
            lines.append(f"Model: `{model}`{route} saw data class {data_class}{found}{stream}.")
    if record.get("tools_offered") or record.get("tools_removed") or record.get("tool_calls_flagged"):
        lines.append(
            f"Tools: offered {_listed(record.get('tools_offered'))}; removed {_listed(record.get('tools_removed'))};"
            f" tool calls flagged {_listed(record.get('tool_calls_flagged'))}."
        )
    else:
        lines.append("Tools: none offered.")
    for action in record.get("actions") or ():
        details = action.get("details") or {}
        said = ", ".join(f"{k} `{v}`" for k, v in details.items() if isinstance(v, str | int | float))
        lines.append(
            f"Action: {action.get('action')} on `{action.get('target')}`: {action.get('outcome')}"
            + (f" ({said})" if said else "")
            + "."
        )
    if record.get("prompt_sha256"):
        completion = record.get("completion_sha256")
        lines.append(
            f"Content: prompt SHA-256 `{record['prompt_sha256']}`"
            + (f", completion SHA-256 `{completion}`" if completion else "")
            + " (the content itself is not recorded)."
        )
    outcome = f"Outcome: {record.get('outcome')} (status {record.get('status')}) in {record.get('latency_ms')} ms"
    if record.get("first_byte_ms") is not None:
        outcome += f", first byte at {record['first_byte_ms']} ms"
    error = record.get("error")
    if error:
        outcome += f"; error `{error.get('code')}`: {error.get('message')}"
    usage = record.get("usage")
    if usage:
        outcome += "; usage " + ", ".join(f"{k} {v}" for k, v in usage.items() if isinstance(v, int | float))
    lines.append(outcome + ".")
    return lines


def explain(trail: Path | Store, request_id: str) -> str:
    """One request's story, one sentence a line; `UnknownRequest` if the trail has no such request."""
    records = _store(trail).request_records(request_id)
    if not records:
        raise UnknownRequest(request_id)
    # why shown(): the story quotes what callers chose (tool names, ids): no control character may
    # reach a reviewer's terminal, nor a newline forge a sentence.
    return "\n".join(shown(line, 1 << 20) for line in _sentences(story(records)))
