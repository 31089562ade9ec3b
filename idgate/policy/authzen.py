"""Decisions for other enforcement points: the OpenID AuthZEN Authorization API 1.0.

An API gateway or an agent framework asks idgate the same question the gateway
asks itself, answered by the same policies and entities:

- `POST /access/v1/evaluation`: one subject/action/resource/context → `{"decision": bool, "context": {...}}`;
- `POST /access/v1/evaluations`: defaults at the top, `evaluations` overriding
  them item by item, and `options.evaluations_semantic`: `execute_all`
  (default), `deny_on_first_deny` or `permit_on_first_permit` (evaluation stops
  after the deciding item; the answer lists the items evaluated);
- `GET /.well-known/authzen-configuration`: where those endpoints are.

The asker authenticates like any caller and must be allowed to ask (config
`authzen`). How AuthZEN's shapes map to idgate's:

- `subject`: `{"type": "human" | "service" | "agent", "id": ..., "properties":
  {"tenant", "groups", "actors": [ids or {"id", "kind"}], "task", "binding"}}`
  (`user` is read as `human`);
- `action.name`: `invoke_model`, `call_tool` or `exchange_token`;
- `resource`: `{"type": "model" | "tool" | "audience", "id": ..., "properties": {...}}`;
  properties describe a resource the entity data does not declare;
- `context`: `{"data_class": ...}`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from idgate.errors import BadRequest, Forbidden, IdgateError
from idgate.identity.allowed import Allowed
from idgate.identity.gate import Gate
from idgate.identity.principal import Actor, Caller, Credential, Principal
from idgate.policy.decision import Authorizer, Decision, Resource
from idgate.proxy.http import Request, Send, send_error

__all__ = ["AuthZen", "evaluate_many", "evaluate_one"]

SEMANTICS = ("execute_all", "deny_on_first_deny", "permit_on_first_permit")
_KINDS = {"human": "human", "user": "human", "service": "service", "agent": "agent"}
_BINDINGS = ("none", "dpop", "mtls")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"`{where}` must be an object")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"`{where}` must be a non-empty string")
    return value


def _caller(subject: dict[str, Any]) -> Caller:
    kind = _KINDS.get(_string(subject.get("type"), "subject.type"))
    if kind is None:
        raise BadRequest("`subject.type` must be one of `human`, `service`, `agent`")
    subject_id = _string(subject.get("id"), "subject.id")
    props = _object(subject.get("properties", {}), "subject.properties")
    tenant = props.get("tenant")
    groups = props.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise BadRequest("`subject.properties.groups` must be a list of strings")
    actors = []
    for i, item in enumerate(props.get("actors", [])):
        if isinstance(item, str):
            actors.append(Actor(item))
            continue
        actor = _object(item, f"subject.properties.actors[{i}]")
        actor_kind = _KINDS.get(str(actor.get("kind", "agent")))
        if actor_kind is None:
            raise BadRequest(f"`subject.properties.actors[{i}].kind` must be human, service or agent")
        actors.append(Actor(_string(actor.get("id"), f"subject.properties.actors[{i}].id"), actor_kind))  # type: ignore[arg-type]
    binding = props.get("binding", "none")
    if binding not in _BINDINGS:
        raise BadRequest("`subject.properties.binding` must be one of none, dpop, mtls")
    task = props.get("task")
    principal = Principal(kind, subject_id, tenant if isinstance(tenant, str) else None, "authzen", tuple(groups))  # type: ignore[arg-type]
    credential = Credential(
        "jwt", "authzen", "authzen", time.time() + 60, binding, task if isinstance(task, str) else None
    )
    return Caller(principal, credential, tuple(actors))


def _resource(resource: dict[str, Any]) -> Resource:
    kind = _string(resource.get("type"), "resource.type")
    if kind not in ("model", "tool", "audience"):
        raise BadRequest("`resource.type` must be one of `model`, `tool`, `audience`")
    props = resource.get("properties")
    attributes = _object(props, "resource.properties") if props is not None else None
    return Resource(kind, _string(resource.get("id"), "resource.id"), attributes=attributes or None)


def _context(context: Any) -> dict[str, Any]:
    if context is None:
        return {}
    context = _object(context, "context")
    return {"data_class": context["data_class"]} if "data_class" in context else {}


def _answer(decision: Decision) -> dict[str, Any]:
    context: dict[str, Any] = {"id": decision.id, "reason": decision.reason}
    if decision.revision:
        context["revision"] = decision.revision
    return {"decision": decision.allowed, "context": context}


def evaluate_one(authorizer: Authorizer, request: Mapping[str, Any]) -> tuple[dict[str, Any], Decision]:
    """One AuthZEN evaluation: the answer and the decision behind it."""
    caller = _caller(_object(request.get("subject"), "subject"))
    action = _string(_object(request.get("action"), "action").get("name"), "action.name")
    resource = _resource(_object(request.get("resource"), "resource"))
    decision = authorizer.authorize(caller, action, resource, _context(request.get("context")))
    return _answer(decision), decision


def evaluate_many(authorizer: Authorizer, body: Mapping[str, Any]) -> tuple[dict[str, Any], list[Decision]]:
    """A batch: top-level defaults, per-item overrides, and the evaluation semantic."""
    items = body.get("evaluations")
    if items is None:  # no batch: a single evaluation, answered as one
        answer, decision = evaluate_one(authorizer, body)
        return answer, [decision]
    if not isinstance(items, list):
        raise BadRequest("`evaluations` must be a list")
    options = _object(body.get("options", {}), "options")
    semantic = options.get("evaluations_semantic", "execute_all")
    if semantic not in SEMANTICS:
        raise BadRequest(f"`options.evaluations_semantic` must be one of {', '.join(SEMANTICS)}")
    defaults = {k: body[k] for k in ("subject", "action", "resource", "context") if k in body}
    answers, decisions = [], []
    for i, item in enumerate(items):
        merged = {**defaults, **_object(item, f"evaluations[{i}]")}
        try:
            answer, decision = evaluate_one(authorizer, merged)
        except BadRequest as exc:
            raise BadRequest(f"evaluations[{i}]: {exc.message}") from None
        answers.append(answer)
        decisions.append(decision)
        if (semantic == "deny_on_first_deny" and not decision.allowed) or (
            semantic == "permit_on_first_permit" and decision.allowed
        ):
            break
    return {"evaluations": answers}, decisions


class AuthZen:
    """The AuthZEN endpoints over the gateway's own authorizer."""

    def __init__(
        self,
        gate: Gate,
        authorizer: Authorizer,
        *,
        base_url: str,
        askers: Allowed,
        max_body_bytes: int,
    ) -> None:
        """`askers`: who may ask (config `authzen`, issuer-qualified)."""
        self._gate = gate
        self._authorizer = authorizer
        self._base = base_url
        self._askers = askers
        self._max_body = max_body_bytes

    def configuration(self) -> dict[str, str]:
        return {
            "policy_decision_point": self._base,
            "access_evaluation_endpoint": f"{self._base}/access/v1/evaluation",
            "access_evaluations_endpoint": f"{self._base}/access/v1/evaluations",
        }

    async def metadata(self, request: Request, send: Send) -> None:
        await _send(send, 200, self.configuration(), request)

    async def evaluation(self, request: Request, send: Send) -> None:
        await self._handle(request, send, batch=False)

    async def evaluations(self, request: Request, send: Send) -> None:
        await self._handle(request, send, batch=True)

    async def _handle(self, request: Request, send: Send, *, batch: bool) -> None:
        try:
            asker = await self._gate.caller(request)
            if not self._askers.admits(asker.subject):
                raise Forbidden("this caller may not ask for decisions (config `authzen`)")
            body = await request.json_object(self._max_body)
            answer = evaluate_many(self._authorizer, body)[0] if batch else evaluate_one(self._authorizer, body)[0]
        except IdgateError as error:
            await send_error(send, error, request.id)
            return
        await _send(send, 200, answer, request)


async def _send(send: Send, status: int, payload: Any, request: Request) -> None:
    # AuthZEN: a PEP's X-Request-ID is echoed; otherwise the gateway's own id.
    echoed = request.header(b"x-request-id")
    safe = echoed is not None and 0 < len(echoed) <= 128 and all(0x21 <= b <= 0x7E for b in echoed)
    request_id = echoed if safe and echoed is not None else request.id.encode()
    body = orjson.dumps(payload)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
