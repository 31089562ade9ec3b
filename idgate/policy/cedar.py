"""`CedarAuthorizer`: the policy decision point, Cedar through cedarpy.

One call, ``authorize(caller, action, resource, context) -> Decision``, pure and
synchronous: everything comes from the arguments and the store's current
snapshot, nothing is fetched. How a call is decided:

1. **The chain.** The subject and every actor of ``caller.actors`` is evaluated
   as the principal of the same request (``context.role`` is ``"subject"`` or
   ``"actor"``); the call is allowed only if every evaluation allows it. A
   policy author cannot forget this: it is not in the policies. A chain longer
   than ``max_delegation_depth`` is refused before Cedar is asked.
2. **The request** (`request.py`): not the whole entity graph but a slice of
   the principals and the resource, whose parents are only what a policy can
   ask about; thousands of grants cost what ten do. The context is built from
   the caller, the resource and ``context["data_class"]`` (the only key the
   pipeline passes; absent, the lowest class).
3. **The verdict.** Any Cedar error, exception or unknown input is a deny with
   reason ``error``. A deny names the forbid policies that matched and their
   ``@reason``; no permit matching is ``scope`` for the subject and
   ``delegation`` for an actor.

Decisions are cached per snapshot, keyed on every input that can change them;
a reload swaps the snapshot and with it the caches.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import cedarpy

from idgate.identity.principal import Caller
from idgate.policy.decision import Decision, Resource
from idgate.policy.graph import ResourceFacts, Uid
from idgate.policy.policies import ACTIONS, PolicyInfo
from idgate.policy.request import BoundedCache, CedarRequest, RequestBuilder
from idgate.policy.store import PolicySnapshot, PolicyStore

__all__ = ["ACTIONS", "CONTEXT_KEYS", "CedarAuthorizer"]

# What the pipeline may put in `context`; everything else comes from caller and resource.
CONTEXT_KEYS = frozenset({"data_class"})

_Outcome = tuple[bool, tuple[str, ...], str, tuple[str, ...], str]  # allowed, policies, reason, errors, denied_for


class _Prepared:
    """Per-snapshot state: the snapshot and the caches computed from it, never another's."""

    __slots__ = ("builder", "decisions", "snapshot")

    def __init__(self, snapshot: PolicySnapshot, cache_size: int, entity_cache_size: int) -> None:
        self.snapshot = snapshot
        self.decisions: BoundedCache[Hashable, _Outcome] = BoundedCache(cache_size)
        self.builder = RequestBuilder(snapshot, entity_cache_size)


class CedarAuthorizer:
    """The `Authorizer` of idgate: decisions by Cedar policies over the store's snapshot.

    `store`: where policies and entities come from (a reload takes effect on the
    next call). `max_delegation_depth`: the most actors a chain may have.
    `cache_size`: decisions remembered per snapshot (0 turns the cache off).
    `entity_cache_size`: entity slices and principals remembered (0 turns it off).
    `validate_requests`: also check each request against the schema (slower;
    the context is built to match it, and the tests check that it does).
    """

    def __init__(
        self,
        store: PolicyStore,
        *,
        max_delegation_depth: int = 3,
        cache_size: int = 10_000,
        entity_cache_size: int = 1_024,
        validate_requests: bool = False,
    ) -> None:
        if max_delegation_depth < 0:
            raise ValueError("max_delegation_depth must be 0 or more")
        self.store = store
        self.max_delegation_depth = max_delegation_depth
        self._cache_sizes = (cache_size, entity_cache_size)
        self._validate = validate_requests
        self._prepared = _Prepared(store.snapshot, *self._cache_sizes)

    @property
    def revision(self) -> str:
        """The policy revision decisions are made with now."""
        return self.store.revision

    def authorize(self, caller: Caller, action: str, resource: Resource, context: Mapping[str, Any]) -> Decision:
        """Decide; never raises. An error of any kind is a deny with reason `error`."""
        revision = ""
        try:
            prepared = self._prepared
            snapshot = self.store.snapshot
            if prepared.snapshot is not snapshot:
                # INVARIANT: caches live in a _Prepared bound to one snapshot, so none outlives a reload.
                prepared = self._prepared = _Prepared(snapshot, *self._cache_sizes)
            revision = snapshot.revision
            outcome = self._decide(prepared, caller, action, resource, context)
        except Exception as exc:  # noqa: BLE001 - INVARIANT: any error is a deny
            outcome = (False, (), "error", (f"{type(exc).__name__}: {exc}",), "")
        return Decision(outcome[0], outcome[1], outcome[2], outcome[3], revision=revision, denied_for=outcome[4])

    def _decide(
        self, prepared: _Prepared, caller: Caller, action: str, resource: Resource, context: Mapping[str, Any]
    ) -> _Outcome:
        depth = len(caller.actors)
        if depth > self.max_delegation_depth:
            problem = f"delegation chain of {depth} actors is longer than the limit of {self.max_delegation_depth}"
            return (False, ("idgate:max-delegation-depth",), "delegation", (problem,), "")
        kinds = ACTIONS.get(action)
        if kinds is None or resource.kind not in kinds:
            problem = f"action `{action}` is not defined for a {resource.kind}"
            return (False, ("idgate:unknown-action",), "scope", (problem,), "")
        if len(context) > 1 or (context and "data_class" not in context):
            unknown = sorted(set(context) - CONTEXT_KEYS)
            raise ValueError(f"context keys {unknown} are not understood; known keys: {sorted(CONTEXT_KEYS)}")
        data_class = context.get("data_class") or prepared.snapshot.classes.lowest
        facts = prepared.snapshot.graph.resource(resource.kind, resource.id)
        if facts is None:
            if resource.attributes is None:
                problem = f"{resource.kind} `{resource.id}` is not declared in the entity data"
                return (False, ("idgate:unknown-resource",), "scope", (problem,), "")
            facts = prepared.snapshot.graph.undeclared_resource(resource.kind, resource.id, resource.attributes)
            return self._evaluate(prepared, caller, action, facts, data_class, declared=False)
        # A declared resource's attributes come from the entity data; any passed in are ignored.
        subject, cred = caller.subject, caller.credential
        # Everything a decision depends on besides the snapshot (which owns this cache).
        key = (
            action,
            facts.uid,
            (subject.kind, subject.id, subject.tenant, tuple(subject.groups)),
            tuple((actor.kind, actor.id) for actor in caller.actors),
            cred.kind,
            cred.binding,
            cred.task,
            data_class,
        )
        outcome = prepared.decisions.get(key)
        if outcome is None:
            outcome = self._evaluate(prepared, caller, action, facts, data_class, declared=True)
            prepared.decisions.put(key, outcome)
        return outcome

    def _evaluate(
        self, prepared: _Prepared, caller: Caller, action: str, facts: ResourceFacts, data_class: str, *, declared: bool
    ) -> _Outcome:
        snapshot = prepared.snapshot
        request: CedarRequest = prepared.builder.build(caller, action, facts, data_class, declared=declared)
        results = cedarpy.is_authorized_batch(
            request.requests,
            snapshot.policies.by_action[action],
            request.entities,
            snapshot.schema if self._validate else None,
        )
        return _verdict(snapshot, request.uids, results)


def _named(uid: Uid) -> str:
    return f'{uid[0]}::"{uid[1]}"'


def _verdict(snapshot: PolicySnapshot, uids: list[Uid], results: list[cedarpy.AuthzResult]) -> _Outcome:
    """Combine the chain's results: any error denies; the first refusal decides; else allow."""
    info = snapshot.policies.info
    errors: list[str] = []
    for uid, result in zip(uids, results, strict=True):
        for error in result.diagnostics.errors:
            for cedar_id, policy in info.items():
                error = error.replace(f"`{cedar_id}`", f"`{policy.id}`")
            errors.append(f"{_named(uid)}: {error}")
    if errors:
        # INVARIANT: Cedar skips a policy that errors, which can skip a forbid; so any error is a deny.
        return (False, (), "error", tuple(errors), "")
    for index, (uid, result) in enumerate(zip(uids, results, strict=True)):
        if result.allowed:
            continue
        forbids = sorted((info[c] for c in result.diagnostics.reasons), key=_index)
        if not forbids:
            return (False, (), "scope" if index == 0 else "delegation", (), _named(uid))
        reason = next((p.reason for p in forbids if p.reason), None) or "scope"
        return (False, tuple(p.id for p in forbids), reason, (), _named(uid))
    permits: dict[str, None] = {}
    for result in results:
        permits.update(dict.fromkeys(p.id for p in sorted((info[c] for c in result.diagnostics.reasons), key=_index)))
    return (True, tuple(permits), "allowed", (), "")


def _index(policy: PolicyInfo) -> int:
    return policy.index
