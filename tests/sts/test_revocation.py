"""Revocation (RFC 7009), introspection (RFC 7662), the kill switch, and failing closed without the store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from idgate.errors import InvalidToken, ServiceUnavailable
from idgate.identity.principal import Caller, Credential, Principal
from idgate.store.sqlite import SqliteStateStore
from idgate.sts.revocation import Liveness
from tests.conftest import MakeGateway
from tests.sts.lifecycle_support import ADMIN, RESOURCE_SERVER, Client, agent, claims_of, human, lifecycle_config, start
from tests.support import Gateway, LoopThread, TestIssuer, Upstream, free_port, wait_for


@pytest.fixture
def served(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path) -> tuple[Gateway, Client]:
    return start(make_gateway, lifecycle_config(issuer, upstream, tmp_path))


def test_revoking_a_token_ends_it_and_everything_exchanged_from_it(
    served: tuple[Gateway, Client], issuer: TestIssuer
) -> None:
    gateway, client = served
    alice = human(issuer)
    parent = client.exchanged(alice, agent(issuer))
    child = client.exchanged(parent, agent(issuer, "agent-9"))
    sibling = client.exchanged(alice, agent(issuer))
    assert client.models(parent) == client.models(child) == 200

    reply = client.call("POST", "/oauth2/revoke", form={"token": parent, "token_type_hint": "access_token"})
    assert reply.status == 200 and reply.headers["cache-control"] == "no-store"
    assert client.models(parent) == 401 and client.models(child) == 401
    refused = client.call("GET", "/v1/models", child)
    assert "a token it was exchanged from was revoked" in refused.json()["error"]["message"]
    assert client.models(sibling) == 200 and client.models(alice) == 200  # only that token's line
    reply = client.exchange(child)
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"

    # Revoking the identity provider's token ends it here and every gateway token made from it.
    assert client.call("POST", "/oauth2/revoke", form={"token": alice}).status == 200
    assert client.models(alice) == 401 and client.models(sibling) == 401

    record = next(r for r in gateway.raw_records() if r["kind"] == "action" and r["action"] == "revocation")
    assert record["target"] == claims_of(parent)["jti"] and record["details"]["kind"] == "token"
    assert parent not in str(gateway.raw_records())  # never the token itself


def test_revocation_answers_per_rfc_7009(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    _, client = served
    # Invalid, unknown or foreign tokens: nothing to do, 200 all the same (RFC 7009 §2.2).
    for token in ("not-a-token", "a.b.c", TestIssuer.mint(issuer, {"iss": "https://evil.example"})):
        assert client.call("POST", "/oauth2/revoke", form={"token": token}).status == 200
    missing = client.call("POST", "/oauth2/revoke", form={"token_type_hint": "access_token"})
    assert missing.status == 400 and missing.json() == {
        "error": "invalid_request",
        "error_description": "parameter `token` is missing",
    }
    wrong_type = client.call("POST", "/oauth2/revoke", json={"token": "x"})
    assert wrong_type.status == 400 and wrong_type.json()["error"] == "invalid_request"
    secret = human(issuer)
    twice = client.call("POST", "/oauth2/revoke", body=f"token={secret}&token=x".encode(), content_type=FORM)
    assert twice.status == 400 and secret not in twice.body.decode()
    assert client.call("GET", "/oauth2/revoke").status == 405


FORM = "application/x-www-form-urlencoded"


def test_introspection_for_resource_servers(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    _, client = served
    rs = issuer.mint({"sub": RESOURCE_SERVER, "kind": "service"})
    alice = human(issuer)
    token = client.exchanged(alice, agent(issuer))
    claims = claims_of(token)

    reply = client.call("POST", "/oauth2/introspect", rs, form={"token": token})
    assert reply.status == 200 and reply.headers["cache-control"] == "no-store"
    answer = reply.json()
    assert answer["active"] is True and answer["token_type"] == "Bearer"
    for name in ("sub", "scope", "exp", "iat", "jti", "iss", "aud", "act"):
        assert answer[name] == claims[name], name
    assert answer["tenant"] == "acme" and answer["sub_id"]["iss"] == issuer.issuer

    for other in ("garbage", alice):  # not a token, or not one of the gateway's
        assert client.call("POST", "/oauth2/introspect", rs, form={"token": other}).json() == {"active": False}
    client.call("POST", "/oauth2/revoke", form={"token": token})
    assert client.call("POST", "/oauth2/introspect", rs, form={"token": token}).json() == {"active": False}

    anonymous = client.call("POST", "/oauth2/introspect", form={"token": token})
    assert anonymous.status == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.json()["error"] == "invalid_token"
    stranger = client.call("POST", "/oauth2/introspect", human(issuer, "mallory"), form={"token": token})
    assert stranger.status == 403 and stranger.json()["error"] == "insufficient_scope"
    missing = client.call("POST", "/oauth2/introspect", rs, form={})
    assert missing.status == 400 and missing.json()["error"] == "invalid_request"


def test_the_kill_switch_for_an_agent(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    gateway, client = served
    alice = human(issuer)
    rogue = agent(issuer, "agent-7")
    delegated = client.exchanged(alice, rogue)
    twice = client.exchanged(delegated, agent(issuer, "agent-9"))  # agent-7 deeper in the chain
    innocent = client.exchanged(alice, agent(issuer, "agent-9"))
    admin = human(issuer, ADMIN)

    forbidden = client.call("POST", "/admin/revoke", alice, json={"agent": "agent-7", "reason": "runaway"})
    assert forbidden.status == 403 and client.models(delegated) == 200
    reply = client.call("POST", "/admin/revoke", admin, json={"agent": "agent-7", "reason": "runaway refunds"})
    assert reply.status == 200, reply.body
    assert reply.json()["revoked"]["kind"] == "agent" and reply.json()["revoked"]["seq"] >= 1

    assert client.models(delegated) == 401 and client.models(twice) == 401 and client.models(rogue) == 401
    assert client.models(innocent) == 200 and client.models(alice) == 200
    reply = client.exchange(alice, rogue)
    assert reply.status == 400 and reply.json()["error"] == "invalid_grant"
    # The kill switch holds until an administrator lifts it: a credential issued afterwards is refused too.
    fixed = agent(issuer, "agent-7", iat=int(time.time()) + 2)
    assert client.models(fixed) == 401 and client.exchange(alice, fixed).status == 400
    lift = {"agent": "agent-7", "reason": "fixed", "lift": True}
    assert client.call("POST", "/admin/revoke", alice, json=lift).status == 403
    reply = client.call("POST", "/admin/revoke", admin, json=lift)
    assert reply.status == 200 and reply.json()["lifted"]["was_held"] is True, reply.body
    assert client.models(fixed) == 200 and client.exchange(alice, fixed).status == 200

    held, lifted = [r for r in gateway.raw_records() if r["kind"] == "action" and r["action"] == "revocation"][-2:]
    assert held["target"] == "agent-7" and held["subject"]["id"] == ADMIN and held["details"]["hold"] is True
    assert held["details"]["reason"] == "runaway refunds"
    assert lifted["target"] == "agent-7" and lifted["outcome"] == "lifted" and lifted["details"]["reason"] == "fixed"


def test_the_kill_switch_for_a_subject_and_a_tenant(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    _, client = served
    admin = issuer.mint({"sub": ADMIN, "kind": "human", "tenant": "ops"})
    alice, bob, carol = human(issuer), human(issuer, "bob"), human(issuer, "carol", tenant="beta")
    alice_gateway_token = client.exchanged(alice)
    reply = client.call("POST", "/admin/revoke", admin, json={"subject": "alice", "reason": "left the company"})
    assert reply.status == 200 and reply.json()["revoked"]["issuer"] == "*"
    assert client.models(alice) == 401 and client.models(alice_gateway_token) == 401 and client.models(bob) == 200

    reply = client.call("POST", "/admin/revoke", admin, json={"tenant": "acme", "reason": "breach"})
    assert reply.status == 200
    assert client.models(bob) == 401 and client.models(carol) == 200 and client.models(admin) == 200

    for body in (
        {"agent": "a", "tenant": "b", "reason": "r"},
        {"agent": "a"},
        {"reason": "r"},
        {"agent": "", "reason": "r"},
        {"agent": "a", "issuer": "https://x", "reason": "r"},
        {"everything": True, "reason": "r"},
    ):
        bad = client.call("POST", "/admin/revoke", admin, json=body)
        assert bad.status == 400, body
    unknown = client.call("POST", "/admin/revoke", admin, json={"task": "task_nope", "reason": "r"})
    assert unknown.status == 404


def test_an_unreachable_store_refuses_every_call(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    dead = f"host=127.0.0.1 port={free_port()} dbname=test user=postgres connect_timeout=1"
    state = {"backend": "postgres", "postgres_dsn": dead}
    _, client = start(make_gateway, lifecycle_config(issuer, upstream, tmp_path, state=state))
    alice = human(issuer)
    refused = client.call("GET", "/v1/models", alice)
    assert refused.status == 503 and refused.json()["error"]["code"] == "unavailable"
    assert "revocation state cannot be checked" in refused.json()["error"]["message"]
    assert client.call("POST", "/tasks", alice, json={"purpose": "p"}).status == 503
    reply = client.exchange(alice)
    assert reply.status == 503 and reply.json()["error"] == "temporarily_unavailable"
    ready = client.call("GET", "/readyz")
    assert ready.status == 503 and ready.json()["checks"]["liveness"] is False
    assert client.call("GET", "/healthz").status == 200


class Forwarder:
    """A TCP relay on loopback to PostgreSQL that can be cut and restored: the store going away and back."""

    def __init__(self, target_port: int = 5432) -> None:
        self.port = free_port()
        self._target = target_port
        self._loop = LoopThread()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.restore()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self._loop.run(self._start())

    def cut(self) -> None:
        self._loop.run(self._cut())

    def stop(self) -> None:
        self.cut()
        self._loop.stop()


def test_the_store_going_away_refuses_calls_within_the_bound_and_coming_back_resumes(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path, pg_schema: str
) -> None:
    forwarder = Forwarder()
    dsn = f"host=127.0.0.1 port={forwarder.port} dbname=test user=postgres connect_timeout=1"
    try:
        state = {"backend": "postgres", "postgres_dsn": dsn, "postgres_schema": pg_schema}
        _, client = start(make_gateway, lifecycle_config(issuer, upstream, tmp_path, state=state))
        alice = human(issuer)
        assert client.models(alice) == 200
        forwarder.cut()
        cut_at = time.monotonic()
        wait_for(lambda: client.models(alice) == 503, timeout=3)
        assert time.monotonic() - cut_at < 1.5  # max_staleness (1 s) and one poll
        forwarder.restore()
        wait_for(lambda: client.models(alice) == 200, timeout=5)
    finally:
        forwarder.stop()


async def test_the_view_is_current_only_once_the_whole_log_is_read(tmp_path: Path) -> None:
    """More entries than one page: none of them may be missing when calls are first answered."""
    store = SqliteStateStore(tmp_path / "state.db")
    now = time.time()
    for i in range(6_000):
        store.revoke("token", f"jti-{i}", issuer=None, at=now, until=now + 600, reason="r", by="b")
    store.revoke("subject", "alice", issuer="https://id.example", at=now, until=now + 600, reason="r", by="b")
    liveness = Liveness(SqliteStateStore(tmp_path / "state.db"))  # another worker's handle

    def caller(jti: str, issued_at: float | None, sub: str = "alice") -> Caller:
        credential = Credential("jwt", jti, "corp", now + 300, issued_at=issued_at)
        return Caller(Principal("human", sub, "acme", "https://id.example"), credential)

    with pytest.raises(ServiceUnavailable):  # nothing read yet: no answer, no allow
        liveness.check(caller("fresh", now + 5))
    await liveness.start()
    try:
        with pytest.raises(InvalidToken):
            liveness.check(caller("jti-5999", now + 5, "bob"))
        with pytest.raises(InvalidToken):  # alice's tokens issued until the revocation, or without `iat`
            liveness.check(caller("other", now - 1))
        with pytest.raises(InvalidToken):
            liveness.check(caller("other", None))
        liveness.check(caller("other", now + 5))  # issued afterwards: alive
        assert liveness.stats()["tokens"] == 6_000
    finally:
        await liveness.stop()
        liveness.store.close()
        store.close()


async def test_a_late_poll_means_a_fresh_read_not_a_refusal(tmp_path: Path) -> None:
    """A view gone stale because its poll came late (a busy loop) catches up on the call instead of refusing it."""
    writer = SqliteStateStore(tmp_path / "state.db")
    liveness = Liveness(SqliteStateStore(tmp_path / "state.db"), poll_interval=30, max_staleness=0.1)
    now = time.time()

    def caller(jti: str) -> Caller:
        return Caller(Principal("human", "alice", "acme", "https://id"), Credential("jwt", jti, "corp", now + 300))

    await liveness.start()
    try:
        await asyncio.sleep(0.2)
        assert not liveness.fresh
        writer.revoke("token", "revoked", issuer=None, at=now, until=now + 60, reason="r", by="b")
        await liveness.verify(caller("alive"))  # no 503: it read the store again
        assert liveness.fresh
        with pytest.raises(InvalidToken):
            await liveness.verify(caller("revoked"))  # and saw what changed
        liveness.store.close()
        liveness.store = SqliteStateStore(tmp_path / "state.db" / "inside-a-file.db")  # a store that cannot open
        await asyncio.sleep(0.2)
        with pytest.raises(ServiceUnavailable):
            await liveness.verify(caller("alive"))
    finally:
        await liveness.stop()
        liveness.store.close()
        writer.close()
