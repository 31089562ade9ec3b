"""AuthZEN 1.0 evaluations against the shipped demo policy, over HTTP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from idgate.app import build_app
from idgate.config import DEFAULT_CONFIG, parse_config
from idgate.errors import ConfigError
from idgate.identity.devissuer import DevIssuer
from tests.conftest import MakeGateway, base_config
from tests.support import Gateway, TestIssuer, Upstream, raw_request

# The response shapes of the AuthZEN Authorization API 1.0 (sections 6 and 7).
DECISION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["decision"],
    "properties": {"decision": {"type": "boolean"}, "context": {"type": "object"}},
}
BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["evaluations"],
    "properties": {"evaluations": {"type": "array", "items": DECISION_SCHEMA}},
}
METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["policy_decision_point", "access_evaluation_endpoint"],
    "properties": {
        "policy_decision_point": {"type": "string", "format": "uri"},
        "access_evaluation_endpoint": {"type": "string"},
        "access_evaluations_endpoint": {"type": "string"},
    },
}

ALICE = {"type": "human", "id": "alice", "properties": {"tenant": "demo"}}
DEMO_CHAT = {"type": "model", "id": "demo-chat"}
INVOKE = {"name": "invoke_model"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The embedded default: the demo policy, the dev issuer, demo models."""
    gateway = Gateway(dict(DEFAULT_CONFIG), tmp_path_factory.mktemp("authzen"))
    yield gateway
    gateway.stop()


def token(gateway: Gateway, *groups: str, sub: str = "pep") -> str:
    return DevIssuer(gateway.config).mint(sub, kind="service", groups=groups)


def ask(gateway: Gateway, path: str, body: Any, bearer: str | None, **headers: str) -> tuple[int, Any, dict[str, str]]:
    sent = {"Content-Type": "application/json", **headers}
    if bearer:
        sent["Authorization"] = f"Bearer {bearer}"
    response = raw_request(gateway.url, "POST", path, body=orjson.dumps(body), headers=sent)
    return response.status, orjson.loads(response.body), response.headers


def test_metadata(demo: Gateway) -> None:
    response = raw_request(demo.url, "GET", "/.well-known/authzen-configuration")
    metadata = orjson.loads(response.body)
    jsonschema.validate(metadata, METADATA_SCHEMA)
    assert metadata["access_evaluation_endpoint"] == f"{demo.config.server.url}/access/v1/evaluation"


def test_single_evaluations_follow_the_demo_policy(demo: Gateway) -> None:
    pep = token(demo, "authzen")
    cases = [
        ({"subject": ALICE, "action": INVOKE, "resource": DEMO_CHAT}, True, "allowed"),
        (
            {"subject": ALICE, "action": INVOKE, "resource": DEMO_CHAT, "context": {"data_class": "restricted"}},
            False,
            "data_class",
        ),
        (
            {
                "subject": {**ALICE, "properties": {"tenant": "demo", "actors": ["bot"]}},
                "action": INVOKE,
                "resource": DEMO_CHAT,
            },
            False,
            "delegation",
        ),
        (
            {
                "subject": {**ALICE, "properties": {"tenant": "demo", "actors": ["bot"], "task": "t1"}},
                "action": INVOKE,
                "resource": DEMO_CHAT,
            },
            True,
            "allowed",
        ),
        ({"subject": {"type": "agent", "id": "bot"}, "action": INVOKE, "resource": DEMO_CHAT}, False, "kind"),
    ]
    for request, allowed, reason in cases:
        status, answer, _ = ask(demo, "/access/v1/evaluation", request, pep)
        assert status == 200
        jsonschema.validate(answer, DECISION_SCHEMA)
        assert answer["decision"] is allowed, request
        assert answer["context"]["reason"] == reason and answer["context"]["id"].startswith("dec_")


BATCH: dict[str, Any] = {
    "subject": ALICE,
    "action": INVOKE,
    "evaluations": [
        {"resource": {"type": "model", "id": "demo-chat"}},
        {"resource": {"type": "model", "id": "demo-chat-mini"}, "context": {"data_class": "confidential"}},
        {"resource": {"type": "model", "id": "demo-embed"}},
        {"resource": {"type": "model", "id": "no-such-model"}},
    ],
}


@pytest.mark.parametrize(
    ("semantic", "expected"),
    [
        (None, [True, False, True, False]),
        ("execute_all", [True, False, True, False]),
        ("deny_on_first_deny", [True, False]),
        ("permit_on_first_permit", [True]),
    ],
)
def test_batch_semantics(demo: Gateway, semantic: str | None, expected: list[bool]) -> None:
    body = dict(BATCH) if semantic is None else {**BATCH, "options": {"evaluations_semantic": semantic}}
    status, answer, _ = ask(demo, "/access/v1/evaluations", body, token(demo, "authzen"))
    assert status == 200
    jsonschema.validate(answer, BATCH_SCHEMA)
    assert [e["decision"] for e in answer["evaluations"]] == expected


def test_permit_on_first_permit_stops_at_the_permit(demo: Gateway) -> None:
    body = {
        **BATCH,
        "evaluations": list(reversed(BATCH["evaluations"])),
        "options": {"evaluations_semantic": "permit_on_first_permit"},
    }
    _, answer, _ = ask(demo, "/access/v1/evaluations", body, token(demo, "authzen"))
    assert [e["decision"] for e in answer["evaluations"]] == [False, True]


def test_a_batch_without_evaluations_is_one_evaluation(demo: Gateway) -> None:
    body = {"subject": ALICE, "action": INVOKE, "resource": DEMO_CHAT}
    _, answer, _ = ask(demo, "/access/v1/evaluations", body, token(demo, "authzen"))
    jsonschema.validate(answer, DECISION_SCHEMA)
    assert answer["decision"] is True


def test_the_asker_must_be_authenticated_and_allowed(demo: Gateway) -> None:
    body = {"subject": ALICE, "action": INVOKE, "resource": DEMO_CHAT}
    status, answer, headers = ask(demo, "/access/v1/evaluation", body, None)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    status, answer, _ = ask(demo, "/access/v1/evaluation", body, token(demo))  # not in the `authzen` group
    assert status == 403 and "may not ask" in answer["error"]["message"]


def test_askers_are_named_with_their_issuer(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream) -> None:
    """A group of the same name at another trusted issuer does not make its members askers."""
    config = {**base_config(issuer, upstream), "dev_issuer": {"enabled": True}}
    config["authzen"] = {"allowed_groups": ["dev:authzen"], "allowed_subjects": ["corp:pep-7"]}
    gateway = make_gateway(config)
    body = {"subject": ALICE, "action": INVOKE, "resource": DEMO_CHAT}
    status, answer, _ = ask(gateway, "/access/v1/evaluation", body, issuer.mint({"groups": ["authzen"]}))
    assert status == 403 and "may not ask" in answer["error"]["message"]
    status, _, _ = ask(gateway, "/access/v1/evaluation", body, token(gateway, "authzen"))
    assert status == 200
    status, _, _ = ask(gateway, "/access/v1/evaluation", body, issuer.mint({"sub": "pep-7"}))
    assert status == 200
    status, _, _ = ask(gateway, "/access/v1/evaluation", body, token(gateway, sub="pep-7"))  # same id, other issuer
    assert status == 403


@pytest.mark.parametrize(
    ("entry", "problem"),
    [("authzen", "must be `ISSUER:VALUE`"), ("nowhere:authzen", "names issuer `nowhere`, which is not configured")],
)
def test_askers_must_name_a_configured_issuer(tmp_path: Path, entry: str, problem: str) -> None:
    config = {**DEFAULT_CONFIG, "state": {"home": str(tmp_path)}, "authzen": {"allowed_groups": [entry]}}
    with pytest.raises(ConfigError, match=re.escape(problem)):
        build_app(parse_config(config))


def test_bad_requests_and_the_request_id_echo(demo: Gateway) -> None:
    pep = token(demo, "authzen")
    status, answer, _ = ask(demo, "/access/v1/evaluation", {"subject": ALICE, "action": INVOKE}, pep)
    assert status == 400 and "`resource` must be an object" in answer["error"]["message"]
    status, answer, _ = ask(demo, "/access/v1/evaluations", {**BATCH, "options": {"evaluations_semantic": "most"}}, pep)
    assert status == 400 and "evaluations_semantic" in answer["error"]["message"]
    body = {"subject": ALICE, "action": INVOKE, "resource": DEMO_CHAT}
    _, _, headers = ask(demo, "/access/v1/evaluation", body, pep, **{"X-Request-ID": "pep-42"})
    assert headers["x-request-id"] == "pep-42"


def test_the_shipped_demo_policy_passes_its_own_cases() -> None:
    from idgate.policy.demo import TESTS
    from idgate.policy.testing import run_policy_tests

    assert run_policy_tests(Path(TESTS)) == []
