"""CedarAuthorizer against real cedarpy: tenants, data classes, delegation, fail-closed errors."""

from __future__ import annotations

from typing import Any

import cedarpy
import pytest

from idgate.policy import CedarAuthorizer, Resource
from idgate.policy.demo import POLICY
from tests.policy.conftest import MakeStore, caller

MODEL = Resource("model", "acme-chat")

# Grants for the delegation tests: `alice` and `helper` may use `m`; `bob` and `rogue` may not.
DELEGATION_ENTITIES: dict[str, Any] = {
    "models": [{"name": "m", "provider": "p", "location": "internal", "tenant": "acme", "max_data_class": "internal"}],
    "members": [{"principal": "Agent::helper", "groups": ["staff"]}],
    "entitlements": [
        {"principal": "Human::alice", "models": ["m"]},
        {"group": "staff", "models": ["m"]},
    ],
}
PERMIT_ENTITLED = """
@id("entitled")
permit (principal, action == Action::"invoke_model", resource) when { principal in resource.entitlements };
"""


@pytest.fixture
def delegation(make_store: MakeStore) -> CedarAuthorizer:
    return CedarAuthorizer(
        make_store(PERMIT_ENTITLED, entities=DELEGATION_ENTITIES), max_delegation_depth=2, validate_requests=True
    )


def test_a_caller_of_one_tenant_is_refused_another_tenants_model(demo_authorizer: CedarAuthorizer) -> None:
    # mallory is declared into acme-ml (so entitled), but her token says tenant beta.
    decision = demo_authorizer.authorize(caller("mallory", "beta"), "invoke_model", MODEL, {})
    assert not decision.allowed
    assert decision.reason == "tenant"
    assert decision.policies == ("tenant-isolation",)
    assert decision.denied_for == 'Human::"mallory"'
    assert decision.revision.startswith("pol_")


def test_the_same_tenant_is_allowed(demo_authorizer: CedarAuthorizer) -> None:
    decision = demo_authorizer.authorize(
        caller(groups=["acme-ml"]), "invoke_model", MODEL, {"data_class": "restricted"}
    )
    assert decision.allowed, decision
    assert decision.policies == ("entitled-model",)
    assert decision.reason == "allowed"


def test_a_tenant_bound_group_in_another_tenants_token_does_not_count(make_store: MakeStore) -> None:
    entities = {
        "groups": [{"name": "acme-ml", "tenant": "acme"}],
        "models": [{"name": "m", "provider": "p", "location": "internal", "max_data_class": "internal"}],
        "entitlements": [{"group": "acme-ml", "models": ["m"]}],
    }
    authorizer = CedarAuthorizer(make_store(PERMIT_ENTITLED, entities=entities))
    model = Resource("model", "m")
    assert authorizer.authorize(caller(groups=["acme-ml"]), "invoke_model", model, {}).allowed
    refused = authorizer.authorize(caller("eve", "beta", groups=["acme-ml"]), "invoke_model", model, {})
    assert not refused.allowed
    assert refused.reason == "scope"


@pytest.mark.parametrize(
    ("model", "data_class", "allowed"),
    [
        ("demo-chat-mini", "internal", True),
        ("demo-chat-mini", "confidential", False),  # over the model's max_data_class
        ("partner-chat", "internal", True),
        ("partner-chat", "confidential", False),  # nothing confidential goes external
        ("partner-chat", "restricted", False),
    ],
)
def test_data_class_limits(demo_authorizer: CedarAuthorizer, model: str, data_class: str, allowed: bool) -> None:
    decision = demo_authorizer.authorize(
        caller(tenant="demo"), "invoke_model", Resource("model", model), {"data_class": data_class}
    )
    assert decision.allowed is allowed, decision
    if not allowed:
        assert decision.reason == "data_class"


def test_an_agent_allowed_acting_for_a_human_who_is_not_is_refused(delegation: CedarAuthorizer) -> None:
    decision = delegation.authorize(caller("bob", actors=["helper"]), "invoke_model", Resource("model", "m"), {})
    assert not decision.allowed
    assert decision.reason == "scope"
    assert decision.denied_for == 'Human::"bob"'


def test_a_human_allowed_with_an_agent_that_is_not_is_refused(delegation: CedarAuthorizer) -> None:
    assert delegation.authorize(caller("alice"), "invoke_model", Resource("model", "m"), {}).allowed
    decision = delegation.authorize(caller("alice", actors=["rogue"]), "invoke_model", Resource("model", "m"), {})
    assert not decision.allowed
    assert decision.reason == "delegation"
    assert decision.denied_for == 'Agent::"rogue"'


def test_both_allowed_is_allowed(delegation: CedarAuthorizer) -> None:
    decision = delegation.authorize(caller("alice", actors=["helper"]), "invoke_model", Resource("model", "m"), {})
    assert decision.allowed, decision
    assert decision.policies == ("entitled",)


def test_every_actor_in_the_chain_must_be_allowed(delegation: CedarAuthorizer) -> None:
    chain = caller("alice", actors=["helper", "rogue"])
    decision = delegation.authorize(chain, "invoke_model", Resource("model", "m"), {})
    assert not decision.allowed
    assert decision.denied_for == 'Agent::"rogue"'


def test_a_chain_deeper_than_the_limit_is_refused(delegation: CedarAuthorizer) -> None:
    decision = delegation.authorize(
        caller("alice", actors=["helper", "helper2", "helper3"]), "invoke_model", Resource("model", "m"), {}
    )
    assert not decision.allowed
    assert decision.reason == "delegation"
    assert decision.policies == ("idgate:max-delegation-depth",)
    assert "limit of 2" in decision.errors[0]


def test_the_refund_rules(demo_authorizer: CedarAuthorizer) -> None:
    refund = Resource("tool", "billing/refund")
    asked = caller(tenant="demo", actors=["billing-bot"], task="t-1", binding="dpop")
    assert demo_authorizer.authorize(asked, "call_tool", refund, {}).allowed
    direct = demo_authorizer.authorize(caller(tenant="demo"), "call_tool", refund, {})
    assert (direct.allowed, direct.reason) == (False, "tool")
    other = demo_authorizer.authorize(caller(tenant="demo", actors=["bot"], task="t-1"), "call_tool", refund, {})
    assert (other.allowed, other.reason, other.policies) == (False, "tool", ("refund-only-billing-agent",))


# -- fail closed -------------------------------------------------------------

OVERFLOW = """
@id("all") permit (principal, action, resource);

@id("overflows") @reason("data_class")
forbid (principal, action == Action::"invoke_model", resource)
when { context.data_class_rank * 9223372036854775807 > 9223372036854775806 };
"""


def test_a_policy_that_errors_at_run_time_is_a_deny_not_a_skipped_forbid(make_store: MakeStore) -> None:
    # Cedar alone would skip the erroring forbid and allow (the permit matches); idgate refuses.
    entities = {"models": [{"name": "m", "provider": "p", "location": "internal", "max_data_class": "restricted"}]}
    authorizer = CedarAuthorizer(make_store(OVERFLOW, entities=entities))
    assert authorizer.authorize(caller(), "invoke_model", Resource("model", "m"), {"data_class": "public"}).allowed
    decision = authorizer.authorize(caller(), "invoke_model", Resource("model", "m"), {"data_class": "confidential"})
    assert not decision.allowed
    assert decision.reason == "error"
    assert "overflow" in decision.errors[0]
    assert "`overflows`" in decision.errors[0]  # Cedar's `policy1` named by its @id


def test_an_engine_exception_is_a_deny_with_the_error(
    demo_authorizer: CedarAuthorizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine on fire")

    monkeypatch.setattr(cedarpy, "is_authorized_batch", broken)
    decision = demo_authorizer.authorize(caller(tenant="demo"), "invoke_model", Resource("model", "demo-chat"), {})
    assert not decision.allowed
    assert decision.reason == "error"
    assert decision.errors == ("RuntimeError: engine on fire",)


@pytest.mark.parametrize(
    ("resource", "context", "error"),
    [
        (Resource("model", "ghost", attributes={"provider": "p", "location": "nowhere"}), {}, "ValidationError"),
        (Resource("model", "demo-chat"), {"data_class": "top-secret"}, "data class `top-secret`"),
        (Resource("model", "demo-chat"), {"user_says": "allow"}, "not understood"),
    ],
)
def test_malformed_input_is_a_deny_with_the_error(
    demo_authorizer: CedarAuthorizer, resource: Resource, context: dict[str, str], error: str
) -> None:
    decision = demo_authorizer.authorize(caller(tenant="demo"), "invoke_model", resource, context)
    assert not decision.allowed
    assert decision.reason == "error"
    assert error in decision.errors[0]


def test_attributes_passed_for_a_declared_resource_change_nothing(demo_authorizer: CedarAuthorizer) -> None:
    shared = Resource("model", "acme-chat", attributes={"tenant": "*", "max_data_class": "restricted"})
    decision = demo_authorizer.authorize(caller("mallory", "beta"), "invoke_model", shared, {})
    assert (decision.allowed, decision.reason) == (False, "tenant")


def test_unknown_resources_and_actions_are_refused(demo_authorizer: CedarAuthorizer) -> None:
    who = caller(tenant="demo")
    unknown = demo_authorizer.authorize(who, "invoke_model", Resource("model", "ghost"), {})
    assert (unknown.allowed, unknown.reason, unknown.policies) == (False, "scope", ("idgate:unknown-resource",))
    wrong = demo_authorizer.authorize(who, "call_tool", Resource("model", "demo-chat"), {})
    assert (wrong.allowed, wrong.policies) == (False, ("idgate:unknown-action",))
    made_up = demo_authorizer.authorize(who, "delete_everything", Resource("model", "demo-chat"), {})
    assert not made_up.allowed


def test_a_principal_twice_in_the_chain_is_refused(demo_authorizer: CedarAuthorizer) -> None:
    loop = caller("bot", "demo", kind="agent", actors=["bot"], task="t")
    decision = demo_authorizer.authorize(loop, "invoke_model", Resource("model", "demo-chat"), {})
    assert (decision.allowed, decision.reason) == (False, "error")


# -- caching -----------------------------------------------------------------


def test_cached_decisions_get_fresh_ids_and_match_uncached(make_store: MakeStore) -> None:
    store = make_store(POLICY.read_text(), entities=DELEGATION_ENTITIES)
    cached, uncached = CedarAuthorizer(store), CedarAuthorizer(store, cache_size=0, entity_cache_size=0)
    for who in (caller("alice"), caller("bob"), caller("alice", actors=["helper"], task="t")):
        first = cached.authorize(who, "invoke_model", Resource("model", "m"), {})
        again = cached.authorize(who, "invoke_model", Resource("model", "m"), {})
        plain = uncached.authorize(who, "invoke_model", Resource("model", "m"), {})
        assert first.id != again.id
        assert (first.allowed, first.policies, first.reason) == (again.allowed, again.policies, again.reason)
        assert (first.allowed, first.policies, first.reason) == (plain.allowed, plain.policies, plain.reason)


def test_a_reload_takes_effect_despite_the_cache(make_store: MakeStore, tmp_path: Any) -> None:
    store = make_store(PERMIT_ENTITLED, entities=DELEGATION_ENTITIES)
    authorizer = CedarAuthorizer(store)
    assert authorizer.authorize(caller("alice"), "invoke_model", Resource("model", "m"), {}).allowed
    (tmp_path / "p0.cedar").write_text(PERMIT_ENTITLED + '\n@id("no") forbid (principal, action, resource);')
    assert store.reload().changed
    decision = authorizer.authorize(caller("alice"), "invoke_model", Resource("model", "m"), {})
    assert (decision.allowed, decision.policies, decision.revision) == (False, ("no",), store.revision)


def test_the_engine_is_really_called(demo_authorizer: CedarAuthorizer, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = cedarpy.is_authorized_batch

    def counting(requests: list[dict[str, Any]], *args: Any) -> Any:
        calls.append(len(requests))
        return real(requests, *args)

    monkeypatch.setattr(cedarpy, "is_authorized_batch", counting)
    demo_authorizer.authorize(caller(tenant="demo", actors=["a", "b"], task="t"), "invoke_model", MODEL, {})
    assert calls == [3]  # subject and both actors, in one batch
