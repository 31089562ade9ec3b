"""Tasks (`POST /tasks`, `GET /tasks/{id}`, `POST /tasks/{id}/complete`) and tokens bound to them."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from tests.conftest import MakeGateway
from tests.sts.lifecycle_support import ADMIN, Client, agent, claims_of, human, lifecycle_config, start
from tests.support import Gateway, TestIssuer, Upstream, wait_for


@pytest.fixture
def served(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path) -> tuple[Gateway, Client]:
    return start(make_gateway, lifecycle_config(issuer, upstream, tmp_path, tasks={"max_lifetime_seconds": 900}))


def test_a_task_is_started_read_and_completed_by_its_subject(
    served: tuple[Gateway, Client], issuer: TestIssuer
) -> None:
    gateway, client = served
    alice = human(issuer)
    before = time.time()
    task = client.start_task(alice, purpose="refund order 42", scope="chat models:read", lifetime_seconds=600)
    assert task["id"].startswith("task_") and len(task["id"]) > 20
    assert task["status"] == "active" and task["purpose"] == "refund order 42"
    assert task["scope"] == "chat models:read" and task["tenant"] == "acme"
    assert task["subject"] == {"id": "alice", "issuer": issuer.issuer} and task["actors"] == []
    assert before <= task["created_at"] and task["expires_at"] == pytest.approx(task["created_at"] + 600)

    read = client.call("GET", f"/tasks/{task['id']}", alice)
    assert read.status == 200 and read.json() == task
    # Someone else's task is answered as if it did not exist.
    bob = human(issuer, "bob")
    assert client.call("GET", f"/tasks/{task['id']}", bob).status == 404
    refused = client.call("POST", f"/tasks/{task['id']}/complete", bob)
    assert refused.status == 404 and refused.json()["error"]["code"] == "not_found"

    done = client.call("POST", f"/tasks/{task['id']}/complete", alice)
    assert done.status == 200, done.body
    assert done.json()["status"] == "completed" and done.json()["completed_by"] == "human:alice"
    assert client.call("GET", f"/tasks/{task['id']}", alice).json()["status"] == "completed"
    again = client.call("POST", f"/tasks/{task['id']}/complete", alice)  # idempotent
    assert again.status == 200 and again.json()["completed_at"] == done.json()["completed_at"]

    actions = [r for r in gateway.raw_records() if r["kind"] == "action" and r["target"] == task["id"]]
    assert [a["action"] for a in actions] == ["task_started", "task_completed"]
    assert all(a["subject"]["id"] == "alice" and a["outcome"] == "ok" for a in actions)


def test_a_token_bound_to_a_task_and_its_descendants_die_when_it_completes(
    served: tuple[Gateway, Client], issuer: TestIssuer
) -> None:
    gateway, client = served
    alice = human(issuer)
    task = client.start_task(alice, purpose="look up invoices", scope="chat")
    bound = client.exchanged(alice, agent(issuer), task=task["id"])
    claims = claims_of(bound)
    assert claims["task"] == task["id"]
    assert claims["scope"] == "chat"  # narrowed to the task's scope
    assert claims["exp"] <= task["expires_at"]
    assert claims["act"]["sub"] == "agent-7"
    # Exchanged again (by another agent): the descendant carries the task and its parent's id.
    descendant = client.exchanged(bound, agent(issuer, "agent-9"))
    assert claims_of(descendant)["task"] == task["id"]
    assert claims["jti"] in claims_of(descendant)["parents"]

    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=bound, max_retries=0, timeout=10)
    with sdk:
        assert [m.id for m in sdk.models.list()]
        assert client.models(descendant) == 200

        assert client.call("POST", f"/tasks/{task['id']}/complete", alice).status == 200
        # The very next call, on this worker, is refused: no waiting for a poll.
        with pytest.raises(openai.AuthenticationError) as refused:
            sdk.models.list()
        assert "its task has ended" in str(refused.value)
    assert client.models(descendant) == 401
    # Nor can either be exchanged any more, nor can the ended task be bound again.
    reply = client.exchange(bound)
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"
    reply = client.exchange(alice, task=task["id"])
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"
    assert "has ended" in reply.json()["error_description"]
    assert client.models(alice) == 200  # the subject's own token is not bound to the task


def test_only_the_tasks_subject_binds_tokens_within_its_scope_and_lifetime(
    served: tuple[Gateway, Client], issuer: TestIssuer
) -> None:
    _, client = served
    alice = human(issuer)
    task = client.start_task(alice, purpose="p", scope="chat models:read", lifetime_seconds=120)

    reply = client.exchange(human(issuer, "bob"), task=task["id"])
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"
    reply = client.exchange(alice, task="task_does_not_exist")
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"
    reply = client.exchange(alice, task=task["id"], scope="chat tools:billing")  # more than the task
    assert reply.status == 400 and reply.json()["error"] == "invalid_scope"
    # A token already bound to one task cannot be bound to another.
    other = client.start_task(alice, purpose="q")
    bound = client.exchanged(alice, task=other["id"])
    reply = client.exchange(bound, task=task["id"])
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"

    token = client.exchanged(alice, task=task["id"], scope="models:read")
    claims = claims_of(token)
    assert claims["scope"] == "models:read" and claims["exp"] <= task["expires_at"] < claims["iat"] + 121
    # An actor may bind a token for the subject it acts for.
    assert claims_of(client.exchanged(alice, agent(issuer), task=task["id"]))["task"] == task["id"]


def test_who_may_complete_a_task(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    _, client = served
    # An agent acting for alice starts the task: alice, that agent, or an administrator may end it.
    delegated = issuer.mint({"sub": "alice", "kind": "human", "act": {"sub": "agent-7"}})
    first = client.start_task(delegated, purpose="p1")
    assert first["subject"]["id"] == "alice" and first["actors"] == ["agent-7"]
    assert client.call("POST", f"/tasks/{first['id']}/complete", agent(issuer, "agent-8")).status == 404
    done = client.call("POST", f"/tasks/{first['id']}/complete", agent(issuer, "agent-7"))
    assert done.status == 200 and done.json()["completed_by"] == "agent:agent-7"

    second = client.start_task(human(issuer), purpose="p2")
    admin = human(issuer, ADMIN)
    assert client.call("GET", f"/tasks/{second['id']}", admin).status == 200
    done = client.call("POST", f"/tasks/{second['id']}/complete", admin)
    assert done.status == 200 and done.json()["completed_by"] == f"human:{ADMIN}"
    # An administrator's token used by an agent is not an administrator.
    third = client.start_task(human(issuer), purpose="p3")
    via_agent = issuer.mint({"sub": ADMIN, "kind": "human", "act": {"sub": "agent-7"}})
    assert client.call("POST", f"/tasks/{third['id']}/complete", via_agent).status == 404


def test_a_task_expires_and_its_tokens_with_it(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    _, client = served
    alice = human(issuer)
    task = client.start_task(alice, purpose="short", lifetime_seconds=2)
    token = client.exchanged(alice, task=task["id"])
    assert claims_of(token)["exp"] <= task["expires_at"]
    assert client.models(token) == 200
    wait_for(lambda: client.models(token) == 401, timeout=5)
    assert time.time() >= claims_of(token)["exp"]
    # The token's `exp` is whole seconds, at or before the task's end; the task itself ends a moment later.
    wait_for(lambda: client.call("GET", f"/tasks/{task['id']}", alice).json()["status"] == "expired", timeout=3)
    reply = client.exchange(alice, task=task["id"])
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"


def test_task_requests_are_checked(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    _, client = served
    alice = human(issuer)
    assert client.call("POST", "/tasks", json={"purpose": "p"}).status == 401
    for body, says in [
        ({"purpose": "p", "color": "red"}, "unknown field `color`"),
        ({"purpose": 5}, "`purpose` must be a non-empty string"),
        ({"lifetime_seconds": -1}, "`lifetime_seconds` must be a positive whole number"),
        ({"lifetime_seconds": True}, "`lifetime_seconds` must be a positive whole number"),
        ({"scope": "chat \x01"}, "not a valid scope token"),
    ]:
        reply = client.call("POST", "/tasks", alice, json=body)
        assert reply.status == 400 and says in reply.json()["error"]["message"], (body, reply.body)
    assert client.call("POST", "/tasks", alice, body=b"[1]", content_type="application/json").status == 400
    # The lifetime is capped by `tasks.max_lifetime_seconds` (900 here).
    capped = client.start_task(alice, lifetime_seconds=10**6, scope=["chat", "models:read"])
    assert capped["expires_at"] - capped["created_at"] == pytest.approx(900)
    assert capped["scope"] == "chat models:read"
    assert client.call("GET", f"/tasks/{capped['id']}/other", alice).status == 404
    wrong = client.call("GET", f"/tasks/{capped['id']}/complete", alice)
    assert wrong.status == 405 and wrong.headers["allow"] == "POST"
    assert client.call("DELETE", f"/tasks/{capped['id']}", alice).status == 405
