"""Entity data: validation, nesting, grants; and the per-request slice decides as the whole graph would."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from idgate.errors import ConfigError
from idgate.policy import CedarAuthorizer, DataClasses, EntityData, Resource, load_entity_data, parse_entity_data
from idgate.policy.demo import POLICY, demo_store
from idgate.policy.graph import EntityGraph
from idgate.policy.request import RequestBuilder
from idgate.policy.store import SCHEMA_PATH
from tests.policy.conftest import MakeStore, caller

MODEL = {"provider": "p", "location": "internal", "max_data_class": "internal"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"entitlements": [{"group": "g", "role": "r"}]}, "exactly one of"),
        ({"members": [{"principal": "alice"}]}, "principal `alice` is not"),
        ({"models": [{"name": "m", **MODEL}, {"name": "m", **MODEL}]}, "models: `m` is declared twice"),
        ({"groups": [{"name": "g", "parents": []}]}, "groups[0].parents: unknown key"),
    ],
)
def test_bad_entity_data_is_refused_with_its_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_entity_data(data, "`entities.yaml`")
    assert message in str(info.value)
    assert str(info.value).startswith("`entities.yaml`: ")


@pytest.mark.parametrize(
    ("grant", "message"),
    [
        ({"models": ["ghost"]}, "entitlements[0].models[0]: model `ghost` is not declared"),
        ({"tools": ["s/ghost"]}, "entitlements[0].tools[0]: tool `s/ghost` is not declared"),
        ({"audiences": ["ghost"]}, "audience `ghost` is not declared"),
    ],
)
def test_a_grant_of_nothing_is_refused_once_the_parts_are_merged(
    make_store: MakeStore, grant: dict[str, Any], message: str
) -> None:
    grants = EntityData.model_validate({"entitlements": [{"group": "g", **grant}]})  # a part alone may grant
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_store("permit (principal, action, resource);", entities=grants.model_dump())


def test_parts_combine_grants_and_declarations(make_store: MakeStore) -> None:
    grants = EntityData.model_validate({"entitlements": [{"group": "g", "models": ["m"], "tools": ["s/*"]}]})
    models = EntityData.model_validate({"models": [{"name": "m", **MODEL}]})
    merged = grants.merge(models)
    merged.check_references()
    store = make_store("permit (principal, action, resource);", entities=merged.model_dump())
    assert store.snapshot.graph.resource("model", "m") is not None


def test_merging_refuses_a_name_declared_twice() -> None:
    part = EntityData.model_validate({"models": [{"name": "m", **MODEL}]})
    with pytest.raises(ConfigError, match="declared twice"):
        part.merge(part)


def test_an_unknown_data_class_on_a_model_is_refused() -> None:
    data = EntityData.model_validate({"models": [{"name": "m", **MODEL, "max_data_class": "secret"}]})
    with pytest.raises(ValueError, match="data class `secret` is not defined"):
        EntityGraph(data, DataClasses())


def test_a_membership_cycle_is_refused(make_store: MakeStore) -> None:
    entities = {"groups": [{"name": "team", "groups": ["dept"]}, {"name": "dept", "groups": ["org", "team"]}]}
    with pytest.raises(ConfigError, match="is part of itself"):
        make_store("permit (principal, action, resource);", entities=entities)


def test_nested_groups_and_roles_grant_through_every_level(make_store: MakeStore) -> None:
    entities = {
        "groups": [
            {"name": "team", "groups": ["dept"]},
            {"name": "dept", "groups": ["org"]},
            {"name": "org", "roles": ["user"]},
        ],
        "roles": [{"name": "user", "roles": ["base"]}],
        "models": [{"name": "m", **MODEL}],
        "entitlements": [{"role": "base", "models": ["m"]}],
    }
    permit = "permit (principal, action, resource) when { principal in resource.entitlements };"
    authorizer = CedarAuthorizer(make_store(permit, entities=entities))
    assert authorizer.authorize(caller(groups=["team"]), "invoke_model", Resource("model", "m"), {}).allowed
    assert not authorizer.authorize(caller(groups=["other"]), "invoke_model", Resource("model", "m"), {}).allowed


def test_a_server_wildcard_grants_tools_found_at_run_time(make_store: MakeStore) -> None:
    entities = {"entitlements": [{"group": "ops", "tools": ["deploy/*"]}]}
    permit = "permit (principal, action, resource) when { principal in resource.entitlements };"
    authorizer = CedarAuthorizer(make_store(permit, entities=entities), validate_requests=True)
    found = Resource("tool", "deploy/rollback", attributes={"action": "write"})
    assert authorizer.authorize(caller(groups=["ops"]), "call_tool", found, {}).allowed
    elsewhere = Resource("tool", "billing/refund", attributes={"action": "refund"})
    assert not authorizer.authorize(caller(groups=["ops"]), "call_tool", elsewhere, {}).allowed
    unlabelled = authorizer.authorize(
        caller(groups=["ops"]), "call_tool", Resource("tool", "deploy/x", attributes={}), {}
    )
    assert unlabelled.reason == "error"  # an undeclared tool must say what class of action it is


def test_the_whole_graph_conforms_to_the_schema() -> None:
    graph = demo_store().snapshot.graph
    schema = cedarpy.Schema.from_str(SCHEMA_PATH.read_text())
    entities = cedarpy.Entities.from_json_str(json.dumps(graph.to_cedar_json()), schema)
    assert len(entities) > 10


def test_entity_files_report_their_yaml_errors(tmp_path: Path) -> None:
    path = tmp_path / "entities.yaml"
    path.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_entity_data(path)


# -- the slice decides as the whole graph does -------------------------------

SLICE_POLICIES = (
    POLICY.read_text()
    + """
@id("quarantine") @reason("scope")
forbid (principal in Group::"g3", action, resource);

@id("role-r1-exchange")
permit (principal in Role::"r1", action == Action::"exchange_token", resource);

@id("tenant-t1-no-external") @reason("tenant")
forbid (principal in Tenant::"t1", action == Action::"invoke_model", resource)
when { resource.location == "external" };
"""
)
PRINCIPAL_TYPES = {"Human", "Service", "Agent"}


def random_entities(rng: random.Random) -> dict[str, Any]:
    groups = [
        {
            "name": f"g{i}",
            "groups": [f"g{rng.randrange(i)}" for _ in range(rng.randrange(3))] if i else [],  # acyclic
            "roles": [f"r{rng.randrange(5)}"] if rng.random() < 0.2 else [],
            **({"tenant": f"t{i % 3}"} if rng.random() < 0.2 else {}),
        }
        for i in range(20)
    ]
    roles = [{"name": f"r{i}", "roles": [f"r{rng.randrange(i)}"] if i and rng.random() < 0.5 else []} for i in range(5)]
    models = [
        {
            "name": f"m{i}",
            "provider": "p",
            "location": rng.choice(("internal", "external")),
            "tenant": rng.choice(("*", "t0", "t1", "t2")),
            "max_data_class": rng.choice(("public", "internal", "confidential", "restricted")),
        }
        for i in range(8)
    ]
    tools = [{"server": f"s{i % 2}", "name": f"x{i}", "action": rng.choice(("read", "refund"))} for i in range(6)]
    members = [
        {"principal": f"Human::u{i}", "groups": [f"g{rng.randrange(20)}"], "roles": []} for i in range(0, 10, 2)
    ] + [{"principal": "Agent::a0", "tenant": "t1", "roles": ["billing-agent", "r2"]}]
    holders = [
        *({"group": f"g{i}"} for i in range(20)),
        *({"role": f"r{i}"} for i in range(5)),
        {"tenant": "t0"},
        {"tenant": "*"},
        {"principal": "Human::u1"},
    ]
    entitlements = [
        {
            **rng.choice(holders),
            "models": rng.sample([m["name"] for m in models], 2),
            "tools": rng.sample([f"{t['server']}/{t['name']}" for t in tools] + ["s1/*"], 1),
        }
        for _ in range(30)
    ]
    return {"groups": groups, "roles": roles, "members": members, "models": models, "tools": tools,
            "entitlements": entitlements}  # fmt: skip


def test_the_slice_decides_exactly_as_the_whole_graph(make_store: MakeStore) -> None:
    rng = random.Random(20)
    store = make_store(SLICE_POLICIES, entities=random_entities(rng))
    snapshot = store.snapshot
    graph = snapshot.graph
    builder = RequestBuilder(snapshot, 0)
    static = [e for e in graph.to_cedar_json() if e["uid"]["type"] not in PRINCIPAL_TYPES]
    compared = allowed = 0
    matched: set[str] = set()
    for _ in range(300):
        tenant = rng.choice(("t0", "t1", "t2", None))
        who = caller(
            f"u{rng.randrange(10)}",
            tenant,
            groups=[f"g{rng.randrange(20)}" for _ in range(rng.randrange(3))],
            actors=rng.choice([(), ("a0",), ("a1",), ("a0", "a1")]),
            task=rng.choice((None, "t")),
        )
        i = rng.randrange(6)
        kind, name = rng.choice([("model", f"m{rng.randrange(8)}"), ("tool", f"s{i % 2}/x{i}")])
        facts = graph.resource(kind, name)
        assert facts is not None
        action = rng.choice(["exchange_token", "invoke_model" if kind == "model" else "call_tool"])
        data_class = rng.choice(("public", "internal", "confidential", "restricted"))
        request = builder.build(who, action, facts, data_class, declared=True)

        # The same requests against every entity, each principal with its direct parents only.
        principals = []
        for index, uid in enumerate(request.uids):
            subject_tenant = who.subject.tenant or ""
            t = subject_tenant if index == 0 else (graph.declared_tenant(uid) or subject_tenant)
            groups = who.subject.groups if index == 0 else ()
            principals.append({
                "uid": {"type": uid[0], "id": uid[1]},
                "attrs": {"tenant": t},
                "parents": [{"type": p[0], "id": p[1]} for p in graph.direct_parents(uid, t, groups)],
            })  # fmt: skip
        whole = cedarpy.Entities.from_json_str(json.dumps(static + principals))
        policy_set, schema = snapshot.policies.policy_set, snapshot.schema
        by_slice = cedarpy.is_authorized_batch(request.requests, policy_set, request.entities, schema)
        by_whole = cedarpy.is_authorized_batch(request.requests, policy_set, whole, schema)
        # ...and only the policies whose scope admits the action (what the authorizer evaluates)
        by_action = cedarpy.is_authorized_batch(request.requests, snapshot.policies.by_action[action], whole, schema)
        for a, b, c in zip(by_slice, by_whole, by_action, strict=True):
            assert a.diagnostics.errors == b.diagnostics.errors == c.diagnostics.errors == []
            assert (a.allowed, sorted(a.diagnostics.reasons)) == (b.allowed, sorted(b.diagnostics.reasons))
            assert (c.allowed, sorted(c.diagnostics.reasons)) == (b.allowed, sorted(b.diagnostics.reasons))
            compared += 1
            allowed += a.allowed
            matched.update(snapshot.policies.info[c].id for c in a.diagnostics.reasons)
    assert compared > 300
    assert 0 < allowed < compared  # the sample has both outcomes
    # ...and reaches the rules that test ancestry against named entities and entitlements
    assert {"quarantine", "role-r1-exchange", "tenant-t1-no-external", "entitled-model", "entitled-tool"} <= matched
