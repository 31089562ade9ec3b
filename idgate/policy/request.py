"""What Cedar is asked for one call: the entity slice and the context.

Not the whole entity graph: a request gets the resource and the principals of
its chain. A principal's parents in the slice are only those a policy can ask
about — the entities the policies name (``Role::"billing-agent"``) and the
resource's entitlements that the principal holds — found with set lookups in the
compiled graph, so thousands of grants cost what ten do.

`RequestBuilder` belongs to one snapshot and keeps what it computes from it: the
parsed resource handles and, when enabled, slices and principals already seen.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

import cedarpy
import orjson

from idgate.identity.principal import Caller
from idgate.policy.entities import PRINCIPAL_TYPES
from idgate.policy.graph import ResourceFacts, Uid, uid_json
from idgate.policy.store import PolicySnapshot

__all__ = ["BoundedCache", "CedarRequest", "RequestBuilder"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A dict that forgets its oldest entry when full (size 0: remembers nothing); thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        with self._lock:
            if len(self._data) >= self.size:
                self._data.pop(next(iter(self._data)))
            self._data[key] = value

    def __len__(self) -> int:
        return len(self._data)


class CedarRequest:
    """One call as Cedar sees it: a request per principal of the chain, and their entities."""

    __slots__ = ("entities", "requests", "uids")

    def __init__(self, uids: list[Uid], requests: list[dict[str, Any]], entities: cedarpy.Entities) -> None:
        self.uids = uids
        self.requests = requests
        self.entities = entities


_Node = tuple[frozenset[Uid], frozenset[Uid]]  # a parent's closure, and the part of it the policies name
_Principal = tuple[tuple[frozenset[Uid], ...], tuple[Uid, ...]]  # closures of direct parents, named ancestors


class RequestBuilder:
    """Builds `CedarRequest`s against one snapshot; `cache_size` bounds slices and principals remembered."""

    def __init__(self, snapshot: PolicySnapshot, cache_size: int) -> None:
        self.snapshot = snapshot
        self._graph = snapshot.graph
        self._literals = snapshot.policies.literals
        self._nodes: dict[Uid, _Node] = {}  # declared nodes only, so bounded by the entity data
        self._resources: dict[Uid, cedarpy.Entities] = {}  # declared resources only
        self._slices: BoundedCache[tuple[Uid, str], cedarpy.Entities] = BoundedCache(cache_size)
        self._principals: BoundedCache[tuple[Uid, str, tuple[str, ...]], _Principal] = BoundedCache(cache_size)

    def _node(self, node: Uid) -> _Node:
        found = self._nodes.get(node)
        if found is None:
            closure = self._graph.closure(node)
            found = (closure, closure & self._literals)
            if self._graph.is_declared(node):
                self._nodes[node] = found
        return found

    def _principal_facts(self, uid: Uid, tenant: str, groups: tuple[str, ...]) -> _Principal:
        key = (uid, tenant, groups)
        facts = self._principals.get(key)
        if facts is None:
            closures = []
            named: set[Uid] = set()
            for node in self._graph.direct_parents(uid, tenant, groups):
                closure, node_named = self._node(node)
                closures.append(closure)
                named |= node_named
            facts = (tuple(closures), tuple(sorted(named)))
            self._principals.put(key, facts)
        return facts

    def _principal_json(self, uid: Uid, tenant: str, groups: tuple[str, ...], resource: ResourceFacts) -> str:
        closures, named = self._principal_facts(uid, tenant, groups)
        held = [g for g in resource.entitlements if g not in named and any(g in closure for closure in closures)]
        # INVARIANT: the schema gives principals and context no entity-valued attributes, so a
        # policy can test a principal's ancestry only against entities it names or the resource's
        # entitlements; keeping just those parents preserves every `in` the policies can evaluate.
        parents = [uid_json(p) for p in (*named, *held)]
        return orjson.dumps({"uid": uid_json(uid), "attrs": {"tenant": tenant}, "parents": parents}).decode()

    def _entities(self, resource: ResourceFacts, principals: str, declared: bool) -> cedarpy.Entities:
        if not declared:
            return cedarpy.Entities.from_json_str(principals[:-1] + "," + resource.entity_json + "]")
        key = (resource.uid, principals)
        entities = self._slices.get(key)
        if entities is None:
            # A declared resource is parsed once; each call adds only its principals (parsing
            # the resource's entity is most of the cost of a slice).
            base = self._resources.get(resource.uid)
            if base is None:
                base = self._resources[resource.uid] = cedarpy.Entities.from_json_str(f"[{resource.entity_json}]")
            entities = base.with_added_json_str(principals)
            self._slices.put(key, entities)
        return entities

    def build(
        self, caller: Caller, action: str, resource: ResourceFacts, data_class: str, *, declared: bool
    ) -> CedarRequest:
        """The Cedar request of `caller` doing `action` on `resource`; subject first, then each actor."""
        subject, actors, cred = caller.subject, caller.actors, caller.credential
        tenant = subject.tenant or ""
        uid: Uid = (PRINCIPAL_TYPES[subject.kind], subject.id)
        uids = [uid]
        parts = [self._principal_json(uid, tenant, tuple(subject.groups), resource)]
        for actor in actors:
            uid = (PRINCIPAL_TYPES[actor.kind], actor.id)
            # An actor's token carries no tenant: the entity data's, else the subject's.
            declared_tenant = self._graph.declared_tenant(uid)
            uids.append(uid)
            parts.append(
                self._principal_json(uid, tenant if declared_tenant is None else declared_tenant, (), resource)
            )
        if len(set(uids)) != len(uids):
            raise ValueError("a principal appears twice in the delegation chain")
        entities = self._entities(resource, "[" + ",".join(parts) + "]", declared)

        ctx: dict[str, Any] = {
            "caller_tenant": tenant,
            "resource_tenant": resource.tenant,
            "data_class": data_class,
            "data_class_rank": self.snapshot.classes.rank(data_class),
            **resource.context,
            "credential_kind": cred.kind,
            "binding": "bearer" if cred.binding == "none" else cred.binding,
            "delegated": bool(actors),
            "depth": len(actors),
            "role": "subject",
            "subject_kind": subject.kind,
            "subject_id": subject.id,
            "has_task": cred.task is not None,
        }
        if actors:
            ctx["acting_agent"] = actors[0].id
        if cred.task is not None:
            ctx["task"] = cred.task
        contexts = [orjson.dumps(ctx).decode()]
        if actors:
            ctx["role"] = "actor"
            contexts += [orjson.dumps(ctx).decode()] * len(actors)
        action_uid = {"type": "Action", "id": action}
        resource_uid = uid_json(resource.uid)
        requests = [
            {"principal": uid_json(u), "action": action_uid, "resource": resource_uid, "context": c}
            for u, c in zip(uids, contexts, strict=True)
        ]
        return CedarRequest(uids, requests, entities)
