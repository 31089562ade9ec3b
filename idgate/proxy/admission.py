"""Classify, then decide: the stages between a parsed request and the upstream call.

- **classify**: the request's data class is the highest of what the caller
  declares (`X-Idgate-Data-Class`), what the config sets for its tenant, and what
  the detectors find in the messages. A caller can raise its class, never lower it.
- **policy**: the model is authorized for this caller at this data class; then
  each function tool the request offers is authorized as the tool
  `functions/NAME` (server name configurable). Tools the caller may not use are
  removed before the model sees them, or the request is refused (by config).
  Each tool's `Decision` is kept (`Admitted.tool_decisions`): every one becomes
  a `decision` record of its own, next to the model's.
- after the answer, `tool_calls` naming a tool the caller may not use are flagged.

The authorizer is pure; this module only prepares its questions and acts on
its answers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from idgate.classify import Classification, Classifier, UnknownDataClass, resolve_class
from idgate.errors import BadRequest, Forbidden, shown
from idgate.identity.principal import Caller
from idgate.policy.decision import Authorizer, Decision, Resource

__all__ = ["DATA_CLASS_HEADER", "Admission", "Admitted"]

DATA_CLASS_HEADER = b"x-idgate-data-class"

# Attributes of a function tool that no entity data declares: the strictest class.
_UNDECLARED_TOOL = {"action": "write", "tenant": "*"}

# OpenAI's own rules for function tools: at most 128 per request, names of 1-64 letters, digits, `_`, `-`.
# why enforce them: each tool is a policy decision and a decision record committed before forwarding,
# and its name is printed by `idgate audit query` / `explain`: unbounded or free-form names would
# let a caller inflate the trail or forge lines in what reviewers read.
MAX_TOOLS = 128
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(slots=True)
class Admitted:
    """What admission decided for one request."""

    data_class: str
    classification: Classification
    decision: Decision
    tools_offered: list[str] = field(default_factory=list)
    tools_removed: list[str] = field(default_factory=list)
    allowed_tools: frozenset[str] = frozenset()
    # why: a tuple default, so a request without tools allocates nothing here (the benchmark path)
    tool_decisions: Sequence[tuple[str, Decision]] = ()  # (`server/NAME`, decision), in the request's order


class Admission:
    def __init__(
        self,
        authorizer: Authorizer,
        classifier: Classifier,
        *,
        tenant_classes: Mapping[str, str],
        unentitled_tools: Literal["remove", "refuse"] = "remove",
        function_tools_server: str = "functions",
    ) -> None:
        self._authorizer = authorizer
        self._classifier = classifier
        self._tenant_classes = tenant_classes
        self._unentitled_tools = unentitled_tools
        self._server = function_tools_server

    def data_class(self, caller: Caller, body: Mapping[str, Any], declared: bytes | None) -> tuple[str, Classification]:
        classification = self._classifier.classify(body)
        label = declared.decode("latin-1").strip() if declared else None
        configured = self._tenant_classes.get(caller.subject.tenant or "")
        try:
            return resolve_class(label, configured, classification.data_class, self._classifier.levels), classification
        except UnknownDataClass as exc:
            raise BadRequest(f"header `X-Idgate-Data-Class`: {exc}") from None

    def admit(self, caller: Caller, model: str, body: dict[str, Any], declared: bytes | None) -> Admitted:
        """Decide the call; raise `Forbidden` (with the decision kept on the exception's admitted)."""
        tools = body.get("tools")
        offered = _function_tools(tools) if isinstance(tools, list) and tools else []
        data_class, classification = self.data_class(caller, body, declared)
        context = {"data_class": data_class}
        decision = self._authorizer.authorize(caller, "invoke_model", Resource("model", model), context)
        admitted = Admitted(data_class, classification, decision)
        admitted.tools_offered = offered  # on record even when the model is refused: `query --tool` finds it
        if not decision.allowed:
            raise Refused(admitted, f"access to model `{model}` is refused ({decision.reason})")
        if offered:
            assert isinstance(tools, list)
            self._filter_tools(caller, body, tools, context, admitted)
        return admitted

    def _filter_tools(
        self,
        caller: Caller,
        body: dict[str, Any],
        tools: list[Any],
        context: dict[str, str],
        admitted: Admitted,
    ) -> None:
        kept: list[Any] = []
        allowed: set[str] = set()
        decisions: list[tuple[str, Decision]] = []
        admitted.tool_decisions = decisions
        decided: dict[str, bool] = {}  # why: a name offered twice is decided (and recorded) once
        for tool in tools:
            name = _tool_name(tool)
            if name is None:
                kept.append(tool)  # not a function tool (a provider's built-in): nothing to authorize
                continue
            if name not in decided:
                resource = Resource("tool", f"{self._server}/{name}", attributes=_UNDECLARED_TOOL)
                decision = self._authorizer.authorize(caller, "call_tool", resource, context)
                decisions.append((resource.id, decision))
                decided[name] = decision.allowed
                if decision.allowed:
                    allowed.add(name)
                else:
                    admitted.tools_removed.append(name)
            if decided[name]:
                kept.append(tool)
        admitted.allowed_tools = frozenset(allowed)
        if not admitted.tools_removed:
            return
        if self._unentitled_tools == "refuse":
            removed = ", ".join(f"`{shown(n)}`" for n in admitted.tools_removed)
            raise Refused(admitted, f"the request offers tools this caller may not use: {removed} (tool)")
        body["tools"] = kept
        if not kept:
            body.pop("tools")
            body.pop("tool_choice", None)
        elif _forced_tool(body.get("tool_choice")) in admitted.tools_removed:
            body["tool_choice"] = "auto"

    @staticmethod
    def flagged_tool_calls(answer: Mapping[str, Any], admitted: Admitted) -> list[str]:
        """Names of tools the model asked to call that this caller may not use."""
        flagged = []
        choices = answer.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            message = choice.get("message") if isinstance(choice, dict) else None
            calls = message.get("tool_calls") if isinstance(message, dict) else None
            for call in calls if isinstance(calls, list) else ():
                name = _tool_name(call)
                if name is not None and name not in admitted.allowed_tools:
                    flagged.append(name)
        return flagged


class Refused(Forbidden):
    """A policy refusal, carrying what admission decided (for the record)."""

    def __init__(self, admitted: Admitted, message: str) -> None:
        super().__init__(message)
        self.admitted = admitted


def _function_tools(tools: list[Any]) -> list[str]:
    """The distinct function tool names a request offers; `BadRequest` past OpenAI's limits."""
    names: dict[str, None] = {}  # in the order offered
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        name = _tool_name(tool)
        if name is None or not _TOOL_NAME.fullmatch(name):
            # why also a missing name: a function tool nobody can authorize must not pass as a built-in one
            raise BadRequest(
                f"`tools[{index}].function.name` must be 1-64 letters, digits, `_` or `-`"
                + (f", not `{shown(name)}`" if isinstance(name, str) else "")
            )
        names[name] = None
        if len(names) > MAX_TOOLS:
            raise BadRequest(f"a request may offer at most {MAX_TOOLS} function tools")
    return list(names)


def _tool_name(item: Any) -> str | None:
    if not isinstance(item, dict) or item.get("type", "function") != "function":
        return None
    function = item.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _forced_tool(choice: Any) -> str | None:
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        return name if isinstance(name, str) else None
    return None
