"""Regression tests of the security review of 2026-11-28 (token service findings).

Each test is the review's proof of concept turned around: it passed against the
code before the fix (the attack worked) and asserts the refusal now.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from idgate.config import parse_config
from idgate.errors import ConfigError, InvalidToken
from idgate.identity.allowed import Allowed
from idgate.identity.principal import Actor, Caller, Credential, Principal
from idgate.store.sqlite import SqliteStateStore
from idgate.sts.exchange import MAX_PARENTS
from idgate.sts.revocation import ANY_ISSUER, HELD, LIFTED, Liveness
from tests.conftest import MakeGateway
from tests.dpop_client import client_assertion
from tests.sts.lifecycle_support import ADMIN, Client, agent, claims_of, human, lifecycle_config, start
from tests.sts.test_clients import FILE_CLIENT_KEY
from tests.sts.test_session_end import CLIENT_ID, RECEIVER, TRANSMITTER, Transmitter, logout, logout_token, push
from tests.support import Gateway, TestIssuer, Upstream, break_audit_trail

ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


def with_client(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """`config` with the agent `reporter`, a registered `private_key_jwt` client."""
    jwks_file = tmp_path / "reporter.jwks.json"
    jwks_file.write_bytes(orjson.dumps({"keys": [FILE_CLIENT_KEY.as_dict(private=False)]}))
    client = {"client_id": "reporter", "jwks_file": str(jwks_file), "kind": "agent", "tenant": "acme"}
    return {**config, "sts": {"clients": [client]}}


def client_token(client: Client, **params: str) -> tuple[int, dict[str, Any]]:
    """`client_credentials` for `reporter`, with a fresh assertion each time."""
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION,
        "client_assertion": client_assertion(FILE_CLIENT_KEY, "reporter", client.url),
        **params,
    }
    reply = client.call("POST", "/oauth2/token", form=form)
    answer: dict[str, Any] = reply.json()
    return reply.status, answer


@pytest.fixture
def served(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path) -> tuple[Gateway, Client]:
    config = with_client(lifecycle_config(issuer, upstream, tmp_path), tmp_path)
    del config["policy"]  # no entity data: every audience of the gateway, its MCP resources too, is entitled
    config["mcp"] = {
        "servers": [
            {"name": "tools", "url": "http://127.0.0.1:9/mcp"},
            {"name": "payments", "url": "http://127.0.0.1:9/p"},
        ]
    }
    return start(make_gateway, config)


# -- finding 2: the kill switch holds until lifted ------------------------------------------------


def test_a_kill_switched_agent_cannot_sign_its_way_back_in(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    gateway, client = served
    status, before = client_token(client)
    assert status == 200 and client.models(before["access_token"]) == 200
    admin = human(issuer, ADMIN)
    reply = client.call("POST", "/admin/revoke", admin, json={"agent": "reporter", "reason": "runaway"})
    assert reply.status == 200 and reply.json()["revoked"]["held"] is True
    assert client.models(before["access_token"]) == 401
    time.sleep(1.1)  # `iat` is whole seconds: a new assertion is issued after the kill switch
    status, after = client_token(client)
    assert status == 401 and after["error"] == "invalid_client", after
    assert "blocked by an administrator" in after["error_description"]
    # Nor as an actor in a token exchange, nor with a token of its own from an identity provider.
    own = agent(issuer, "reporter", iat=int(time.time()) + 1)
    assert client.models(own) == 401
    assert client.exchange(human(issuer), own).status == 400

    lifted = client.call("POST", "/admin/revoke", admin, json={"agent": "reporter", "reason": "fixed", "lift": True})
    assert lifted.status == 200 and lifted.json()["lifted"]["was_held"] is True, lifted.body
    status, fresh = client_token(client)
    assert status == 200 and client.models(fresh["access_token"]) == 200
    assert client.models(before["access_token"]) == 200  # the hold was all that ended it
    records = [r for r in gateway.raw_records() if r["kind"] == "action" and r["action"] == "revocation"]
    assert [r["outcome"] for r in records] == ["ok", "lifted"] and records[1]["subject"]["id"] == ADMIN
    for body in ({"token": "j", "reason": "r", "lift": True}, {"agent": "a", "reason": "r", "lift": "yes"}):
        assert client.call("POST", "/admin/revoke", admin, json=body).status == 400, body


def test_a_subject_and_tenant_hold_refuses_fresh_logins_until_lifted(
    served: tuple[Gateway, Client], issuer: TestIssuer
) -> None:
    _, client = served
    admin = issuer.mint({"sub": ADMIN, "kind": "human", "tenant": "ops"})
    for target in ({"subject": "alice"}, {"tenant": "acme"}):
        assert client.call("POST", "/admin/revoke", admin, json={**target, "reason": "incident"}).status == 200
        later = human(issuer, iat=int(time.time()) + 5)  # a login after the kill switch
        assert client.models(later) == 401
        assert client.exchange(later).status == 400
        lift = {**target, "reason": "resolved", "lift": True}
        assert client.call("POST", "/admin/revoke", admin, json=lift).status == 200
        assert client.models(later) == 200


async def test_holds_and_lifts_replay_in_seq_order_for_every_worker(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "state.db")
    now = time.time()

    def caller(sub: str, issued_at: float, actor: str | None = None, tenant: str = "acme") -> Caller:
        credential = Credential("jwt", f"jti-{sub}", "corp", now + 300, issued_at=issued_at)
        actors = (Actor(actor),) if actor else ()
        return Caller(Principal("human", sub, tenant, "https://id.example"), credential, actors)

    try:
        store.revoke("agent", "rogue", issuer=None, at=now, until=HELD, reason="r", by="b")
        store.revoke("agent", "rogue", issuer=None, at=now, until=LIFTED, reason="r", by="b")
        store.revoke("subject", "bob", issuer=ANY_ISSUER, at=now, until=HELD, reason="r", by="b")
        store.revoke("tenant", "beta", issuer=None, at=now, until=HELD, reason="r", by="b")
        # A session-end entry keeps its `iat` meaning: later logins live.
        store.revoke("subject", "carol", issuer="https://id.example", at=now, until=now + 60, reason="r", by="b")
        liveness = Liveness(SqliteStateStore(tmp_path / "state.db"))  # another worker, reading from the start
        await liveness.start()
        try:
            liveness.check(caller("alice", now + 10, actor="rogue"))  # held, then lifted
            with pytest.raises(InvalidToken, match="blocked"):
                liveness.check(caller("bob", now + 3600))  # whatever its `iat`
            with pytest.raises(InvalidToken, match="blocked"):
                liveness.check(caller("dave", now + 3600, tenant="beta"))
            with pytest.raises(InvalidToken):
                liveness.check(caller("carol", now - 1))
            liveness.check(caller("carol", now + 10))
            # An older entry arriving after a newer one changes nothing.
            lift = store.revoke("subject", "bob", issuer=ANY_ISSUER, at=now, until=LIFTED, reason="r", by="b")
            await liveness.refresh()
            liveness.check(caller("bob", now))
            hold = store.changes(0, now)[2]
            assert hold.until == HELD and hold.seq < lift.seq
            liveness.apply(hold)
            liveness.check(caller("bob", now))
        finally:
            await liveness.stop()
            liveness.store.close()
    finally:
        store.close()


async def test_a_local_revocation_does_not_skip_entries_other_workers_wrote_before_it(tmp_path: Path) -> None:
    other = SqliteStateStore(tmp_path / "state.db")
    liveness = Liveness(SqliteStateStore(tmp_path / "state.db"), poll_interval=30)
    now = time.time()

    def caller(jti: str) -> Caller:
        return Caller(Principal("human", "alice", "acme", "https://id"), Credential("jwt", jti, "corp", now + 300))

    await liveness.start()
    try:
        other.revoke("token", "written-elsewhere", issuer=None, at=now, until=now + 60, reason="r", by="b")
        await liveness.revoke("token", "written-here", until=now + 60, reason="r", by="b")
        await liveness.refresh()
        for jti in ("written-elsewhere", "written-here"):
            with pytest.raises(InvalidToken):
                liveness.check(caller(jti))
    finally:
        await liveness.stop()
        liveness.store.close()
        other.close()


# -- finding 3: a delegation chain is never cut --------------------------------------------------


def test_a_chain_deeper_than_max_parents_is_refused_not_cut(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    _, client = served
    root = client.exchanged(human(issuer), agent(issuer))
    token, chain = root, [root]
    while len(claims_of(token)["parents"]) < MAX_PARENTS:
        token = client.exchanged(token)
        chain.append(token)
        assert claims_of(root)["jti"] in claims_of(token)["parents"]
    deeper = client.exchange(token)
    assert deeper.status == 400 and deeper.json()["error"] == "invalid_grant"
    assert "delegation chain too deep" in deeper.json()["error_description"]
    assert client.call("POST", "/oauth2/revoke", form={"token": root}).status == 200
    assert all(client.models(t) == 401 for t in chain)


# -- finding 5: no scope held, none granted ------------------------------------------------------


def test_a_token_without_a_scope_claim_is_exchanged_for_no_scope(
    served: tuple[Gateway, Client], issuer: TestIssuer
) -> None:
    _, client = served
    id_token = issuer.mint({"sub": "alice", "kind": "human", "nonce": "n"})  # like an ID token: no `scope`
    asked = client.exchange(id_token, scope="billing:admin", subject_token_type=ID_TOKEN)
    assert asked.status == 400 and asked.json()["error"] == "invalid_scope", asked.body
    # With an actor that holds the scope, the subject still holds none.
    scoped_agent = agent(issuer, scope="billing:admin")
    assert client.exchange(id_token, scoped_agent, scope="billing:admin").json()["error"] == "invalid_scope"
    plain = client.exchange(id_token, subject_token_type=ID_TOKEN)
    assert (
        plain.status == 200 and "scope" not in plain.json() and "scope" not in claims_of(plain.json()["access_token"])
    )
    # A task's scope is a ceiling, not a grant.
    task = client.start_task(id_token, purpose="p", scope="billing:admin")
    bound = client.exchange(id_token, task=task["id"])
    assert bound.status == 200 and "scope" not in claims_of(bound.json()["access_token"])


# -- finding 6: an MCP resource is its own audience ----------------------------------------------


def test_a_token_for_an_mcp_resource_is_good_there_only(served: tuple[Gateway, Client]) -> None:
    _, client = served
    tools = f"{client.url}/mcp/tools"
    status, answer = client_token(client, resource=tools)
    assert status == 200, answer
    token = answer["access_token"]
    assert claims_of(token)["aud"] == tools
    refused = client.call("GET", "/v1/models", token)
    assert refused.status == 401 and "MCP server only" in refused.json()["error"]["message"]
    other = client.call("POST", "/mcp/payments", token, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert other.status == 401
    for bare in (client.url, client.url + "/"):
        status, answer = client_token(client, resource=bare)
        assert status == 200 and claims_of(answer["access_token"])["aud"] == "idgate-test"
        assert client.models(answer["access_token"]) == 200
    for stray in (f"{client.url}/mcp/nope", f"{client.url}/v1"):
        status, answer = client_token(client, resource=stray)
        assert status == 400 and answer["error"] == "invalid_target", answer


# -- finding 9: an issued token's record is committed before the token leaves ---------------------


def test_no_token_is_sent_when_its_record_cannot_be_committed(
    served: tuple[Gateway, Client], issuer: TestIssuer
) -> None:
    gateway, client = served
    alice = human(issuer)
    assert client.exchange(alice).status == 200
    break_audit_trail(gateway)
    reply = client.exchange(alice)  # its record cannot be made durable: queued would mean sent
    assert reply.status == 503 and reply.json()["error"] == "temporarily_unavailable", reply.body
    assert "access_token" not in reply.json()


# -- finding 7: rights are issuer-qualified ------------------------------------------------------


def test_admins_introspectors_and_task_owners_are_matched_by_issuer_and_id(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    partner = TestIssuer()  # another trusted issuer, whose subjects may carry the same ids
    try:
        config = lifecycle_config(issuer, upstream, tmp_path)
        config["issuers"].append({"name": "partner", "issuer": partner.issuer, "discovery": True})
        config["admin"] = {"subjects": [f"corp:{ADMIN}"], "groups": ["corp:ops-admins"]}
        config["introspection"] = {"allowed_subjects": ["corp:rs-billing"], "allowed_groups": ["corp:introspection"]}
        _, client = start(make_gateway, config)
        kill = {"token": "some-jti", "reason": "test"}
        assert client.call("POST", "/admin/revoke", human(partner, ADMIN), json=kill).status == 403
        in_group = {"sub": "eve", "kind": "human", "groups": ["ops-admins", "introspection"]}
        assert client.call("POST", "/admin/revoke", partner.mint(in_group), json=kill).status == 403
        assert client.call("POST", "/admin/revoke", issuer.mint(in_group), json=kill).status == 200
        assert client.call("POST", "/admin/revoke", human(issuer, ADMIN), json=kill).status == 200

        token = client.exchanged(human(issuer), agent(issuer))
        for asker, status in (
            (partner.mint({"sub": "rs-billing", "kind": "service"}), 403),
            (partner.mint(in_group), 403),
            (issuer.mint({"sub": "rs-billing", "kind": "service"}), 200),
            (issuer.mint(in_group), 200),
        ):
            assert client.call("POST", "/oauth2/introspect", asker, form={"token": token}).status == status

        task = client.start_task(token, purpose="refunds")  # alice, through agent-7 of `corp`
        assert task["actors"] == ["agent-7"]
        assert client.call("GET", f"/tasks/{task['id']}", agent(partner, "agent-7", tenant="acme")).status == 404
        assert client.call("GET", f"/tasks/{task['id']}", agent(issuer, "agent-7", tenant="acme")).status == 200
        assert client.call("GET", f"/tasks/{task['id']}", human(partner)).status == 404  # a partner `alice`
    finally:
        partner.stop()


def test_unqualified_or_unknown_issuer_entries_are_config_errors() -> None:
    for section, key in (("admin", "subjects"), ("admin", "groups"), ("introspection", "allowed_subjects")):
        with pytest.raises(ConfigError, match="ISSUER:VALUE"):
            parse_config({"dev_issuer": {"enabled": True}, section: {key: ["root"]}})
    with pytest.raises(ValueError, match=re.escape("admin.subjects: `nowhere:root` names issuer `nowhere`")):
        Allowed(("nowhere:root",), (), {"corp": "https://id.example"}, "admin")
    allowed = Allowed(
        ("corp:root", "mesh:spiffe://td/admin"), ("corp:ops",), {"corp": "https://id", "mesh": "spiffe://td"}
    )
    assert allowed.admits(Principal("human", "root", None, "https://id"))
    assert allowed.admits(Principal("service", "spiffe://td/admin", None, "spiffe://td"))
    assert allowed.admits(Principal("human", "x", None, "https://id", ("ops",)))
    assert not allowed.admits(Principal("human", "root", None, "https://other"))
    assert not allowed.admits(Principal("human", "x", None, "https://other", ("ops",)))


# -- finding 11: session-end signals follow each issuer's identifiers ----------------------------


def test_session_end_signals_use_the_issuers_claim_mapping_and_only_its_transmitters_issuers(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    staff = TestIssuer()  # an identity provider whose principal ids are email addresses
    transmitter = Transmitter(tmp_path)
    try:
        config = lifecycle_config(issuer, upstream, tmp_path)
        config["issuers"].append(
            {"name": "staff", "issuer": staff.issuer, "discovery": True, "claims": {"subject": "email"}}
        )
        config["backchannel_logout"] = {"issuers": ["corp", "staff"], "audiences": [CLIENT_ID]}
        config["ssf"] = {
            "transmitters": [
                {
                    "issuer": TRANSMITTER,
                    "jwks_file": str(transmitter.jwks_file),
                    "audience": RECEIVER,
                    "issuers": ["staff"],
                }
            ]
        }
        _, client = start(make_gateway, config)
        alice_staff = staff.mint({"sub": "u-1", "email": "Alice@Example.com", "kind": "human"})
        alice_corp, bob_corp = human(issuer), human(issuer, "bob")
        assert client.models(alice_staff) == client.models(alice_corp) == 200

        # Opaque ids end subjects of the issuers the transmitter speaks for, not every issuer's.
        assert push(client, transmitter.event({"format": "opaque", "id": "alice"})).status == 202
        assert client.models(alice_corp) == 200
        foreign = transmitter.event({"format": "iss_sub", "iss": issuer.issuer, "sub": "bob"})
        assert push(client, foreign).status == 400 and client.models(bob_corp) == 200
        session = {"format": "complex", "session": {"format": "opaque", "id": "s-9"}}
        assert push(client, transmitter.event(session)).status == 202
        assert client.models(human(issuer, sid="s-9")) == 200  # a `corp` session of the same id lives
        # An email ends the subject whose id is that email, whatever its case.
        assert push(client, transmitter.event({"format": "email", "email": "alice@example.com"})).status == 202
        assert client.models(alice_staff) == 401 and client.models(alice_corp) == 200

        # Back-channel logout by `sub` cannot name a `staff` principal (their ids are emails)...
        by_sub = logout(client, logout_token(staff, sid=None, sub="u-2"))
        assert by_sub.status == 400 and "`sid`" in by_sub.json()["error_description"]
        # ...and still works where the ids are the `sub`.
        assert logout(client, logout_token(issuer, sid=None, sub="bob")).status == 200
        assert client.models(bob_corp) == 401
    finally:
        staff.stop()
