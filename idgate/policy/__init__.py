"""The policy stage: `authorize(caller, action, resource, context) -> Decision`.

Pure and synchronous: everything the decision needs is passed in, nothing is
fetched. Any error inside an authorizer is a deny that carries the error.

Wiring, in one place::

    store = PolicyStore(policy_files, entities=EntityData(...), entity_files=[...], classes=DataClasses(...))
    authorizer = CedarAuthorizer(store, max_delegation_depth=3)
    watcher = PolicyWatcher(store, interval=1.0)      # asyncio.create_task(watcher.run())
"""

from __future__ import annotations

from idgate.policy.cedar import CedarAuthorizer
from idgate.policy.data_classes import DEFAULT_DATA_CLASSES, DataClasses
from idgate.policy.decision import REASONS, Authorizer, Decision, Resource
from idgate.policy.entities import (
    AudienceSpec,
    EntitlementSpec,
    EntityData,
    GroupSpec,
    MemberSpec,
    ModelSpec,
    RoleSpec,
    ToolSpec,
    load_entity_data,
    parse_entity_data,
)
from idgate.policy.policies import PolicyError, PolicyProblem
from idgate.policy.store import PolicySnapshot, PolicyStore, PolicyWatcher, ReloadOutcome, load_policies

__all__ = [
    "DEFAULT_DATA_CLASSES",
    "REASONS",
    "AudienceSpec",
    "Authorizer",
    "CedarAuthorizer",
    "DataClasses",
    "Decision",
    "EntitlementSpec",
    "EntityData",
    "GroupSpec",
    "MemberSpec",
    "ModelSpec",
    "PolicyError",
    "PolicyProblem",
    "PolicySnapshot",
    "PolicyStore",
    "PolicyWatcher",
    "ReloadOutcome",
    "Resource",
    "RoleSpec",
    "ToolSpec",
    "load_entity_data",
    "load_policies",
    "parse_entity_data",
]
