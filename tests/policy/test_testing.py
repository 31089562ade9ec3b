"""`run_policy_tests`: the shipped demo cases pass; a wrong expectation is reported with its reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from idgate.errors import ConfigError
from idgate.policy import EntityData, load_entity_data
from idgate.policy.demo import ENTITIES, MODELS, POLICY, TESTS, demo_store
from idgate.policy.testing import load_policy_tests, run_policy_tests


def test_the_shipped_demo_cases_pass() -> None:
    assert load_policy_tests(TESTS).cases  # not vacuously
    assert run_policy_tests(TESTS) == []


def test_the_demo_cases_pass_with_models_given_as_the_config_would() -> None:
    models = EntityData(models=tuple(load_entity_data(MODELS).models))
    assert run_policy_tests(TESTS, store=demo_store(models=models)) == []


def write_cases(tmp_path: Path, cases: list[dict[str, object]]) -> Path:
    path = tmp_path / "tests.yaml"
    path.write_text(
        yaml.safe_dump({"policies": [str(POLICY)], "entities": [str(ENTITIES), str(MODELS)], "cases": cases})
    )
    return path


def test_a_wrong_expectation_is_reported_with_the_decisions_reasons(tmp_path: Path) -> None:
    path = write_cases(
        tmp_path,
        [
            {
                "name": "external confidential",
                "caller": {"id": "alice", "tenant": "demo"},
                "action": "invoke_model",
                "resource": {"model": "partner-chat"},
                "context": {"data_class": "confidential"},
                "expect": "allow",
            },
            {
                "caller": {"id": "alice", "tenant": "demo", "actors": ["bot"]},
                "action": "invoke_model",
                "resource": {"model": "demo-chat"},
                "expect": "deny",
                "reason": "kind",  # right decision, wrong reason
            },
            {
                "caller": {"id": "alice", "tenant": "demo"},
                "action": "invoke_model",
                "resource": {"model": "demo-chat"},
                "expect": "allow",
            },
        ],
    )
    first, second = run_policy_tests(path)
    assert first.index == 0
    assert str(first) == (
        "external confidential: expected allow, got deny (data_class); policies: no-confidential-external; "
        'refused for Human::"alice"'
    )
    assert second.name == "case 2"
    assert "expected deny (kind), got deny (delegation)" in str(second)
    assert "agent-needs-human-task" in str(second)


def test_a_resource_described_inline(tmp_path: Path) -> None:
    ghost = {"model": "ghost", "provider": "x", "location": "external", "tenant": "*", "max_data_class": "restricted"}
    path = write_cases(
        tmp_path,
        [
            {
                "caller": {"id": "alice", "tenant": "demo"},
                "action": "invoke_model",
                "resource": ghost,
                "expect": "deny",
                "reason": "scope",  # described, but granted to no one
            }
        ],
    )
    assert run_policy_tests(path) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("cases: [", "not valid YAML"),
        ("policies: [p.cedar]\ncases: [{caller: {id: a}, action: x, resource: {model: m}, expect: maybe}]", "expect"),
        ("policies: [p.cedar]\ncases: [{caller: {id: a}, action: x, resource: {}, expect: deny}]", "exactly one of"),
        (
            "policies: [p.cedar]\ncases: [{caller: {id: a}, action: x, resource: {model: m}, expect: deny, reason: x}]",
            "is not one of",
        ),
    ],
)
def test_a_malformed_test_file_is_refused(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "tests.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_policy_tests(path)


def test_a_case_may_name_an_mtls_caller(tmp_path: Path) -> None:
    """A client certificate (X.509-SVID) is a credential kind a case can name, as the gateway sees it."""
    caller = {"kind": "service", "id": "spiffe://demo/svc", "tenant": "demo", "credential": "x509-svid"}
    path = write_cases(
        tmp_path,
        [
            {
                "caller": {**caller, "binding": "mtls"},
                "action": "invoke_model",
                "resource": {"model": "demo-chat"},
                "expect": "allow",
            }
        ],
    )
    cases = load_policy_tests(path).cases
    assert cases[0].caller.credential == "x509-svid"
    assert run_policy_tests(path) == []
