"""The entity graph, compiled once from `EntityData`: closures and resource facts.

Membership must be acyclic, as in Cedar: a group that is part of itself is refused.

Every holder (group, role, tenant, declared principal) gets the closure of what
it belongs to, at any depth, once at load. A request then asks "does one of this
principal's direct parents reach entitlement E?" — a few set lookups, whatever
the number of grants. `to_cedar_json` renders the whole graph as Cedar entities
(for schema checks and export); decisions never use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from idgate.policy.data_classes import DataClasses
from idgate.policy.entities import (
    AudienceSpec,
    EntitlementSpec,
    EntityData,
    ModelSpec,
    ToolSpec,
    parse_principal,
)

__all__ = ["ALL_TENANTS", "EntityGraph", "ResourceFacts", "Uid", "uid_json"]

Uid = tuple[str, str]  # (entity type, entity id)
ALL_TENANTS: Uid = ("Tenant", "*")
RESOURCE_TYPES = {"model": "Model", "tool": "Tool", "audience": "Audience"}


def uid_json(uid: Uid) -> dict[str, str]:
    return {"type": uid[0], "id": uid[1]}


@dataclass(frozen=True, slots=True)
class ResourceFacts:
    """A resource as decisions see it: its uid, tenant, grants, Cedar JSON and context."""

    uid: Uid
    tenant: str
    entitlements: tuple[Uid, ...]
    entity_json: str  # one Cedar entity, pre-serialized
    context: Mapping[str, str] = field(default_factory=dict)  # provider/location or tool/tool_action


def _grants(grant: EntitlementSpec) -> list[Uid]:
    return [
        *(("Entitlement", f"model:{m}") for m in grant.models),
        *(("Entitlement", f"tool:{t}") for t in grant.tools),
        *(("Entitlement", f"audience:{a}") for a in grant.audiences),
    ]


def _holder(grant: EntitlementSpec) -> Uid:
    if grant.group is not None:
        return ("Group", grant.group)
    if grant.role is not None:
        return ("Role", grant.role)
    if grant.tenant is not None:
        return ("Tenant", grant.tenant)
    assert grant.principal is not None
    return parse_principal(grant.principal)


class EntityGraph:
    """`EntityData` compiled for decisions; immutable once built."""

    def __init__(self, data: EntityData, classes: DataClasses) -> None:
        self.data = data
        self.classes = classes
        edges: dict[Uid, set[Uid]] = {}

        def link(child: Uid, parents: Iterable[Uid]) -> None:
            edges.setdefault(child, set()).update(parents)

        for group in data.groups:
            link(("Group", group.name), [*(("Group", g) for g in group.groups), *(("Role", r) for r in group.roles)])
        for role in data.roles:
            link(("Role", role.name), (("Role", r) for r in role.roles))
        self._member_tenant: dict[Uid, str | None] = {}
        for member in data.members:
            uid = parse_principal(member.principal)
            self._member_tenant[uid] = member.tenant
            link(uid, [*(("Group", g) for g in member.groups), *(("Role", r) for r in member.roles)])
        for grant in data.entitlements:
            link(_holder(grant), _grants(grant))
        self._edges = {node: tuple(sorted(parents)) for node, parents in edges.items()}
        self._closure = self._close(self._edges)
        self._group_tenant = {g.name: g.tenant for g in data.groups if g.tenant is not None}
        self._resources: dict[Uid, ResourceFacts] = {}
        for model in data.models:
            self._add(self._model(model))
        for tool in data.tools:
            self._add(self._tool(tool))
        for audience in data.audiences:
            self._add(self._audience(audience))

    @staticmethod
    def _close(edges: Mapping[Uid, tuple[Uid, ...]]) -> dict[Uid, frozenset[Uid]]:
        """Every node's ancestors, itself included; `ValueError` on a cycle (Cedar refuses them)."""
        done: dict[Uid, frozenset[Uid]] = {}
        for start in edges:
            seen = {start}
            stack = [start]
            while stack:
                node = stack.pop()
                for parent in edges.get(node, ()):
                    if parent in seen:
                        continue
                    if parent in done:
                        seen |= done[parent]
                    else:
                        seen.add(parent)
                        stack.append(parent)
            done[start] = frozenset(seen)
        for node, parents in edges.items():
            for parent in parents:
                if parent == node or node in done.get(parent, ()):
                    raise ValueError(f'`{node[0]}::"{node[1]}"` is part of itself through `{parent[0]}::"{parent[1]}"`')
        return done

    def _add(self, facts: ResourceFacts) -> None:
        self._resources[facts.uid] = facts

    def _model(self, spec: ModelSpec) -> ResourceFacts:
        uid = ("Model", spec.name)
        attrs = {
            "tenant": spec.tenant,
            "provider": spec.provider,
            "location": spec.location,
            "max_data_class": self.classes.rank(spec.max_data_class),
        }
        grants = (("Entitlement", f"model:{spec.name}"),)
        return self._facts(uid, spec.tenant, grants, attrs, {"provider": spec.provider, "location": spec.location})

    def _tool(self, spec: ToolSpec) -> ResourceFacts:
        uid = ("Tool", spec.id)
        attrs = {"server": spec.server, "name": spec.name, "action_class": spec.action, "tenant": spec.tenant}
        grants = (("Entitlement", f"tool:{spec.id}"), ("Entitlement", f"tool:{spec.server}/*"))
        return self._facts(uid, spec.tenant, grants, attrs, {"tool": spec.id, "tool_action": spec.action})

    def _audience(self, spec: AudienceSpec) -> ResourceFacts:
        uid = ("Audience", spec.name)
        return self._facts(uid, spec.tenant, (("Entitlement", f"audience:{spec.name}"),), {"tenant": spec.tenant}, {})

    @staticmethod
    def _facts(
        uid: Uid, tenant: str, grants: tuple[Uid, ...], attrs: dict[str, Any], context: dict[str, str]
    ) -> ResourceFacts:
        entity = {
            "uid": uid_json(uid),
            "attrs": {**attrs, "entitlements": [{"__entity": uid_json(g)} for g in grants]},
            "parents": [],
        }
        return ResourceFacts(uid, tenant, grants, orjson.dumps(entity).decode(), context)

    # -- what decisions ask -------------------------------------------------

    def resource(self, kind: str, id: str) -> ResourceFacts | None:
        """A declared resource (`kind` is "model", "tool" or "audience"), or None."""
        entity_type = RESOURCE_TYPES.get(kind)
        return None if entity_type is None else self._resources.get((entity_type, id))

    def undeclared_resource(self, kind: str, id: str, attributes: Mapping[str, Any]) -> ResourceFacts:
        """A resource the entity data does not declare, from attributes its caller vouches for.

        It is granted by entitlements to its own id only if the data holds one
        (for a tool, `server/*` grants also count). `ValueError` on bad attributes.
        """
        if kind == "model":
            return self._model(ModelSpec.model_validate({**attributes, "name": id}))
        if kind == "tool":
            server, _, name = id.partition("/")
            if "action" not in attributes:
                raise ValueError(f"tool `{id}` is not declared and names no `action`")
            return self._tool(ToolSpec.model_validate({**attributes, "server": server, "name": name}))
        if kind == "audience":
            return self._audience(AudienceSpec.model_validate({**attributes, "name": id}))
        raise ValueError(f"resource kind `{kind}` is not one of `model`, `tool`, `audience`")

    def declared_tenant(self, uid: Uid) -> str | None:
        """The tenant the data gives a declared principal (used for actors, whose tokens carry none)."""
        return self._member_tenant.get(uid)

    def direct_parents(self, uid: Uid, tenant: str, token_groups: Iterable[str] = ()) -> tuple[Uid, ...]:
        """A principal's direct parents: declared memberships, its token's groups, its tenant.

        A token's group bound to a tenant in the data counts only for that tenant.
        """
        parents = list(self._edges.get(uid, ()))
        for group in token_groups:
            bound = self._group_tenant.get(group)
            if bound is None or bound == tenant:
                parents.append(("Group", group))
        if tenant:
            parents.append(("Tenant", tenant))
        parents.append(ALL_TENANTS)
        return tuple(parents)

    def is_declared(self, node: Uid) -> bool:
        """Whether the entity data says anything about `node`'s memberships or grants."""
        return node in self._closure

    def closure(self, node: Uid) -> frozenset[Uid]:
        """`node` and everything it belongs to, at any depth."""
        return self._closure.get(node) or frozenset((node,))

    def to_cedar_json(self) -> list[dict[str, Any]]:
        """The whole graph as a Cedar entities document (declared nodes, resources, grants)."""
        nodes: dict[Uid, tuple[Uid, ...]] = dict(self._edges)
        for parents in self._edges.values():
            for parent in parents:
                nodes.setdefault(parent, ())
        for facts in self._resources.values():
            for grant in facts.entitlements:
                nodes.setdefault(grant, ())
        out: list[dict[str, Any]] = []
        for uid, parents in sorted(nodes.items()):
            attrs: dict[str, Any] = {}
            if uid[0] in ("Human", "Service", "Agent"):
                tenant = self._member_tenant.get(uid) or ""
                attrs["tenant"] = tenant
                parents = (*parents, *([("Tenant", tenant)] if tenant else []), ALL_TENANTS)
            out.append({"uid": uid_json(uid), "attrs": attrs, "parents": [uid_json(p) for p in parents]})
        out.extend(orjson.loads(facts.entity_json) for facts in self._resources.values())
        return out
