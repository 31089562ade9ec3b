"""The audit records of MCP traffic, built in one place.

A relayed request leaves the records of `idgate.audit.records`, linked by
`request_id` and the W3C `trace_id`:

- `identity`: who called (always);
- `decision` (for `tools/call`, `resources/read`, `prompts/get`): the policy's
  answer on the tool `SERVER/NAME` with its action class and the arguments'
  data class; committed, with the identity record, before the call goes upstream;
- `action` `tool_call`: what was done: the tool, its outcome, the SHA-256 of the
  arguments, the minted credential's `jti` and audience (never the token), the
  budget counts, the upstream status and latency;
- `action` `tool_pinned` / `tool_changed`: a tool first pinned, or withheld
  because its description or schema changed;
- `action` `list_filtered`: a `tools/list`, `resources/list`,
  `resources/templates/list` or `prompts/list` answer filtered for the caller:
  how many entries the server listed and how many were withheld (one record per
  answer, never one per entry).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from idgate.audit.records import RequestFacts, action_record, decision_of
from idgate.identity.principal import Caller
from idgate.policy.decision import Decision

__all__ = ["arguments_digest", "list_record", "pin_record", "tool_call_record", "tool_decision_record"]


def arguments_digest(arguments: Any) -> str | None:
    if arguments is None:
        return None
    try:
        return hashlib.sha256(orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)).hexdigest()
    except TypeError:
        return None


def tool_decision_record(
    facts: RequestFacts, tool: str, action_class: str, data_class: str, decision: Decision
) -> dict[str, Any]:
    """The policy decision on one tool call (the shape of `decision_record`, for a tool)."""
    resource = {"type": "tool", "id": tool}
    return decision_of(facts, "call_tool", resource, data_class, decision, {"action_class": action_class})


def tool_call_record(
    facts: RequestFacts,
    tool: str,
    outcome: str,
    details: Mapping[str, Any],
) -> dict[str, Any]:
    """The `tool_call` action: `outcome` "ok", "refused" or "error"; `details` plain values, no secret."""
    return action_record(facts.request_id, facts.trace_id, facts.caller, "tool_call", tool, outcome, details)


def pin_record(facts: RequestFacts, caller: Caller | None, tool: str, changed: bool, digest: str) -> dict[str, Any]:
    """A tool pinned on first listing, or withheld because it changed since."""
    action = "tool_changed" if changed else "tool_pinned"
    details = {"sha256": digest, "withheld": changed}
    return action_record(
        facts.request_id, facts.trace_id, caller, action, tool, "refused" if changed else "ok", details
    )


def list_record(
    facts: RequestFacts, caller: Caller, server: str, method: str, outcome: str, listed: int, withheld: int
) -> dict[str, Any]:
    """A list answer filtered for `caller`: how many entries `server` listed and how many were withheld."""
    details = {"method": method, "listed": listed, "withheld": withheld}
    return action_record(facts.request_id, facts.trace_id, caller, "list_filtered", server, outcome, details)
