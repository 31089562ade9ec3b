"""The public surface of `idgate.policy`, pinned: a change here is a deliberate API change."""

from __future__ import annotations

import idgate.policy


def test_the_public_names() -> None:
    assert set(idgate.policy.__all__) == {
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
    }
    for name in idgate.policy.__all__:
        assert getattr(idgate.policy, name) is not None
