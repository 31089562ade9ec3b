"""Session-end signals: OpenID Connect back-channel logout, and CAEP `session-revoked` events (RFC 8935 push)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from tests.conftest import MakeGateway
from tests.sts.lifecycle_support import Client, agent, human, lifecycle_config, start
from tests.support import Gateway, RawResponse, TestIssuer, Upstream

LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
CLIENT_ID = "idgate-client"  # the gateway's client id at the identity provider
TRANSMITTER = "https://ssf.transmitter.example"
RECEIVER = "https://idgate.example/ssf"


class Transmitter:
    """A Shared Signals transmitter: its key is published in a JWKS file the gateway is configured with."""

    def __init__(self, folder: Path) -> None:
        self.key = ECKey.generate_key("P-256", parameters={"use": "sig", "alg": "ES256"})
        self.key.ensure_kid()
        self.jwks_file = folder / "transmitter.jwks.json"
        self.jwks_file.write_bytes(orjson.dumps({"keys": [self.key.as_dict(private=False)]}))

    def event(self, subject: dict[str, Any], *, key: ECKey | None = None, **claims: Any) -> str:
        key = key or self.key
        body = {
            "iss": TRANSMITTER,
            "aud": RECEIVER,
            "iat": int(time.time()),
            "jti": secrets.token_hex(8),
            "sub_id": subject,
            "events": {SESSION_REVOKED: {"event_timestamp": int(time.time())}},
            **claims,
        }
        header = {"alg": "ES256", "kid": self.key.kid, "typ": "secevent+jwt"}
        return jwt.encode(header, {k: v for k, v in body.items() if v is not None}, key)


@pytest.fixture
def transmitter(tmp_path: Path) -> Transmitter:
    return Transmitter(tmp_path)


@pytest.fixture
def served(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path, transmitter: Transmitter
) -> tuple[Gateway, Client]:
    config = lifecycle_config(
        issuer,
        upstream,
        tmp_path,
        backchannel_logout={"issuers": ["corp"], "audiences": [CLIENT_ID]},
        ssf={
            "transmitters": [
                {
                    "issuer": TRANSMITTER,
                    "jwks_file": str(transmitter.jwks_file),
                    "audience": RECEIVER,
                    "issuers": ["corp"],  # whose subjects and sessions its events may end
                }
            ]
        },
    )
    return start(make_gateway, config)


def logout_token(issuer: TestIssuer, *, key: RSAKey | ECKey | None = None, **claims: Any) -> str:
    body = {"sid": "sess-1", "jti": secrets.token_hex(8), "events": {LOGOUT_EVENT: {}}, "tenant": None, **claims}
    return issuer.mint(body, key=key, audience=CLIENT_ID, header={"typ": "logout+jwt"})


def logout(client: Client, token: str) -> RawResponse:
    return client.call("POST", "/oauth2/backchannel-logout", form={"logout_token": token})


def push(client: Client, event: str, content_type: str = "application/secevent+jwt") -> RawResponse:
    return client.call("POST", "/ssf/events", body=event.encode(), content_type=content_type)


# -- back-channel logout -------------------------------------------------------------------------


def test_backchannel_logout_ends_the_session_and_every_token_derived_from_it(
    served: tuple[Gateway, Client], issuer: TestIssuer
) -> None:
    gateway, client = served
    session_1, session_2 = human(issuer, sid="sess-1"), human(issuer, sid="sess-2")
    derived = client.exchanged(session_1, agent(issuer))
    derived_again = client.exchanged(derived, agent(issuer, "agent-9"))
    other = client.exchanged(session_2)
    assert all(client.models(t) == 200 for t in (session_1, derived, derived_again, other))

    token = logout_token(issuer, sid="sess-1", sub="alice")
    reply = logout(client, token)
    assert reply.status == 200, reply.body
    assert reply.headers["cache-control"] == "no-store"
    assert [client.models(t) for t in (session_1, derived, derived_again)] == [401, 401, 401]
    assert client.models(session_2) == 200 and client.models(other) == 200  # another session lives on

    replayed = logout(client, token)
    assert replayed.status == 400 and replayed.json()["error"] == "invalid_request"
    assert "already used" in replayed.json()["error_description"]
    record = next(r for r in gateway.raw_records() if r["kind"] == "action" and r["action"] == "revocation")
    assert record["target"] == "sess-1" and record["details"]["kind"] == "session"


def test_backchannel_logout_by_subject_ends_all_of_its_tokens(
    served: tuple[Gateway, Client], issuer: TestIssuer
) -> None:
    _, client = served
    alice, bob = human(issuer, sid="sess-1"), human(issuer, "bob")
    derived = client.exchanged(alice)
    assert logout(client, logout_token(issuer, sid=None, sub="alice")).status == 200
    assert client.models(alice) == 401 and client.models(derived) == 401 and client.models(bob) == 200
    # A login after the logout (a token issued later) works.
    assert client.models(human(issuer, iat=int(time.time()) + 2)) == 200


def test_invalid_logout_tokens_change_nothing(served: tuple[Gateway, Client], issuer: TestIssuer) -> None:
    _, client = served
    alice = human(issuer, sid="sess-1")
    stranger = RSAKey.generate_key(2048, parameters={"use": "sig", "kid": str(issuer.keys[0].kid)})
    other_issuer = TestIssuer()
    try:
        cases = {
            "signed by an unknown key": logout_token(issuer, key=stranger),
            "for another audience": issuer.mint(
                {"sid": "sess-1", "jti": "j1", "events": {LOGOUT_EVENT: {}}}, audience="someone-else"
            ),
            "with a nonce": logout_token(issuer, nonce="n"),
            "without the logout event": logout_token(issuer, events={"urn:other": {}}),
            "without jti": logout_token(issuer, jti=None),
            "without sid or sub": logout_token(issuer, sid=None, sub=None),
            "issued long ago": logout_token(issuer, iat=int(time.time()) - 3600),
            "from an issuer not taken logouts from": logout_token(other_issuer),
            "not a JWT": "not-a-jwt",
        }
        for what, token in cases.items():
            reply = logout(client, token)
            assert reply.status == 400, what
            assert reply.json()["error"] == "invalid_request", what
            assert reply.headers["cache-control"] == "no-store"
    finally:
        other_issuer.stop()
    assert client.call("POST", "/oauth2/backchannel-logout", form={}).status == 400
    assert client.models(alice) == 200


# -- CAEP session-revoked, pushed by a transmitter ------------------------------------------------


def test_a_caep_event_from_the_transmitter_revokes_derived_tokens(
    served: tuple[Gateway, Client], issuer: TestIssuer, transmitter: Transmitter
) -> None:
    gateway, client = served
    alice, bob = human(issuer), human(issuer, "bob")
    derived = client.exchanged(alice, agent(issuer))
    subject = {"format": "iss_sub", "iss": issuer.issuer, "sub": "alice"}

    # The same event signed by a key the transmitter does not publish (even under its `kid`) changes nothing.
    forged_key = ECKey.generate_key("P-256", parameters={"use": "sig"})
    forged = push(client, transmitter.event(subject, key=forged_key))
    assert forged.status == 400 and forged.json() == {
        "err": "invalid_key",
        "description": "the event is not signed by a key of its transmitter",
    }
    assert client.models(alice) == 200 and client.models(derived) == 200

    event = transmitter.event(subject)
    reply = push(client, event)
    assert reply.status == 202 and reply.body == b""
    assert client.models(alice) == 401 and client.models(derived) == 401
    assert client.models(bob) == 200
    assert push(client, event).status == 202  # a duplicate delivery is accepted, and acted on once
    records = [r for r in gateway.raw_records() if r["kind"] == "action" and r["action"] == "revocation"]
    assert len(records) == 1 and records[0]["details"]["via"] == "ssf"
    assert records[0]["details"]["transmitter"] == TRANSMITTER


def test_a_caep_event_for_one_session(
    served: tuple[Gateway, Client], issuer: TestIssuer, transmitter: Transmitter
) -> None:
    _, client = served
    session_1, session_2 = human(issuer, sid="s-1"), human(issuer, sid="s-2")
    derived = client.exchanged(session_1)
    subject = {
        "format": "complex",
        "user": {"format": "iss_sub", "iss": issuer.issuer, "sub": "alice"},
        "session": {"format": "opaque", "id": "s-1"},
    }
    assert push(client, transmitter.event(subject)).status == 202
    assert client.models(session_1) == 401 and client.models(derived) == 401 and client.models(session_2) == 200
    # By an opaque id: the subject with that id at the issuers the transmitter speaks for.
    bob = human(issuer, "bob@example.com")
    assert push(client, transmitter.event({"format": "opaque", "id": "bob@example.com"})).status == 202
    assert client.models(bob) == 401
    # By email: only where an issuer's subject ids are email addresses, which `corp`'s are not.
    refused = push(client, transmitter.event({"format": "email", "email": "carol@example.com"}))
    assert refused.status == 400 and "by `email`" in refused.json()["description"]


def test_caep_events_are_checked_per_rfc_8935(
    served: tuple[Gateway, Client], issuer: TestIssuer, transmitter: Transmitter
) -> None:
    _, client = served
    alice = human(issuer)
    subject = {"format": "iss_sub", "iss": issuer.issuer, "sub": "alice"}
    cases = [
        (transmitter.event(subject, iss="https://unknown.example"), "invalid_issuer"),
        (transmitter.event(subject, aud="https://someone-else.example"), "invalid_audience"),
        (transmitter.event(subject, jti=None), "invalid_request"),
        (transmitter.event(subject, iat=int(time.time()) - 3600), "invalid_request"),
        (transmitter.event({"format": "phone_number", "phone_number": "+1"}), "invalid_request"),
        (transmitter.event({"format": "iss_sub", "iss": issuer.issuer}), "invalid_request"),
        ("x.y.z", "invalid_request"),
    ]
    for event, err in cases:
        reply = push(client, event)
        assert reply.status == 400 and reply.json()["err"] == err, (err, reply.body)
        assert set(reply.json()) == {"err", "description"}
    wrong_type = push(client, transmitter.event(subject), content_type="application/jwt")
    assert wrong_type.status == 400 and wrong_type.json()["err"] == "invalid_request"
    # Another event type is accepted and changes nothing here.
    other = transmitter.event(subject, events={"https://schemas.openid.net/secevent/caep/event-type/x": {}})
    assert push(client, other).status == 202
    assert client.models(alice) == 200
