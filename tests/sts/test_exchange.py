"""Token exchange (RFC 8693) through HTTP, against real servers on loopback."""

from __future__ import annotations

import time
from typing import Any, cast

import openai
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, KeySetSerialization

from tests.sts.conftest import ACCESS_TOKEN, JWT, TOKEN_EXCHANGE, Reply, StsGateway
from tests.support import TestIssuer, Upstream

HUMAN_SCOPE = "chat models:read tools:billing"


def human(issuer: TestIssuer, **claims: Any) -> str:
    return issuer.mint({"sub": "alice", "kind": "human", "scope": HUMAN_SCOPE, "task": "task-1", **claims})


def agent(issuer: TestIssuer, sub: str = "agent-7", ttl: int = 300, **claims: Any) -> str:
    return issuer.mint({"sub": sub, "kind": "agent", **claims}, ttl=ttl)


def verified(sts_gateway: StsGateway, token: str) -> dict[str, Any]:
    """The token's claims, checked against the JWKS the gateway publishes."""
    keys = KeySet.import_key_set(cast(KeySetSerialization, sts_gateway.get("/.well-known/jwks.json").body))
    decoded = jwt.decode(token, keys, algorithms=["ES256", "RS256"])
    assert decoded.header["typ"] == "at+jwt"
    claims: dict[str, Any] = decoded.claims
    return claims


def refused(reply: Reply, error: str, status: int = 400) -> str:
    assert reply.status == status, reply.body
    assert reply.body["error"] == error, reply.body
    assert set(reply.body) == {"error", "error_description"}
    assert reply.headers["cache-control"] == "no-store"
    description: str = reply.body["error_description"]
    return description


def test_metadata_and_jwks(sts_gateway: StsGateway) -> None:
    metadata = sts_gateway.get("/.well-known/oauth-authorization-server").body
    assert metadata["issuer"] == sts_gateway.url
    assert metadata["token_endpoint"] == f"{sts_gateway.url}/oauth2/token"
    assert metadata["jwks_uri"] == f"{sts_gateway.url}/.well-known/jwks.json"
    assert TOKEN_EXCHANGE in metadata["grant_types_supported"]  # the other grants: tests/sts/test_clients.py
    assert "none" in metadata["token_endpoint_auth_methods_supported"]  # public clients may exchange
    jwks = sts_gateway.get("/.well-known/jwks.json")
    assert jwks.headers["content-type"] == "application/jwk-set+json"
    (key,) = jwks.body["keys"]
    assert key["alg"] == "ES256" and key["use"] == "sig" and key["kid"]
    assert "d" not in key


def test_human_and_agent_exchange_for_a_nested_act_token(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    before = int(time.time())
    reply = sts_gateway.exchange(human(issuer), agent(issuer), scope="chat models:read")
    assert reply.status == 200, reply.body
    assert reply.headers["cache-control"] == "no-store"
    assert reply.body["issued_token_type"] == ACCESS_TOKEN
    assert reply.body["token_type"] == "Bearer"
    assert reply.body["scope"] == "chat models:read"
    assert 295 <= reply.body["expires_in"] <= 300
    claims = verified(sts_gateway, reply.body["access_token"])
    assert claims["iss"] == sts_gateway.url
    assert claims["sub"] == "alice"
    assert claims["sub_id"] == {"format": "iss_sub", "iss": issuer.issuer, "sub": "alice"}
    assert claims["aud"] == "idgate-test"
    assert claims["scope"] == "chat models:read"
    assert claims["task"] == "task-1"
    assert claims["tenant"] == "acme" and claims["kind"] == "human"
    assert claims["act"] == {"sub": "agent-7", "kind": "agent", "iss": issuer.issuer}
    assert before <= claims["iat"] <= claims["exp"] - 295
    assert claims["exp"] - claims["iat"] <= 300
    assert claims["jti"]


def test_issued_token_calls_the_gateway_with_the_openai_sdk(
    sts_gateway: StsGateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    original = human(issuer)
    with openai.OpenAI(base_url=f"{sts_gateway.url}/v1", api_key=original, max_retries=0) as client:
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    pseudonym = upstream.received[-1]["body"]["user"]
    token = sts_gateway.exchange(original, agent(issuer)).body["access_token"]
    with openai.OpenAI(base_url=f"{sts_gateway.url}/v1", api_key=token, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.parse().choices[0].message.content == "upstream says hi"
    record = sts_gateway.gateway.record(raw.headers["x-request-id"])
    assert record["subject"]["id"] == "alice"
    assert [a["id"] for a in record["actors"]] == ["agent-7"]
    assert record["credential"]["issuer"] == "idgate"
    assert record["subject"]["issuer"] == issuer.issuer  # where alice was first verified
    assert upstream.received[-1]["body"]["user"] == pseudonym  # the same person upstream, exchanged or not


def test_scope_is_what_the_subject_holds_when_none_is_asked(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    reply = sts_gateway.exchange(human(issuer), agent(issuer, scope="chat other"))
    assert reply.body["scope"] == "chat"


def test_asking_more_scope_than_the_subject_holds_is_invalid_scope(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    reply = sts_gateway.exchange(human(issuer), agent(issuer), scope="chat admin")
    assert "`admin`" in refused(reply, "invalid_scope")


def test_asking_more_scope_than_the_actor_holds_is_invalid_scope(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    reply = sts_gateway.exchange(human(issuer), agent(issuer, scope="chat"), scope="chat models:read")
    assert "actor_token" in refused(reply, "invalid_scope")


def test_gateway_token_exchanged_again_only_narrows(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    first = sts_gateway.exchange(human(issuer), agent(issuer), scope="chat models:read").body["access_token"]
    wider = sts_gateway.exchange(first, scope="chat tools:billing")
    assert "`tools:billing`" in refused(wider, "invalid_scope")
    other_audience = sts_gateway.exchange(first, audience="ledger")
    refused(other_audience, "invalid_target")
    narrower = sts_gateway.exchange(first, agent(issuer, "agent-8"), scope="chat")
    assert narrower.status == 200, narrower.body
    claims = verified(sts_gateway, narrower.body["access_token"])
    assert claims["scope"] == "chat"
    assert claims["aud"] == "idgate-test"
    assert claims["sub_id"]["iss"] == issuer.issuer
    assert claims["act"] == {
        "sub": "agent-8",
        "kind": "agent",
        "iss": issuer.issuer,
        "act": {"sub": "agent-7", "kind": "agent", "iss": issuer.issuer},
    }
    assert claims["exp"] <= verified(sts_gateway, first)["exp"]


def test_may_act_limits_who_may_act(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    subject = human(issuer, may_act={"sub": "agent-7", "iss": issuer.issuer})
    assert sts_gateway.exchange(subject, agent(issuer, "agent-7")).status == 200
    description = refused(sts_gateway.exchange(subject, agent(issuer, "agent-9")), "invalid_grant")
    assert "`agent-9`" in description and "may_act" in description
    other_issuer = human(issuer, may_act={"sub": "agent-7", "iss": "https://elsewhere"})
    refused(sts_gateway.exchange(other_issuer, agent(issuer, "agent-7")), "invalid_grant")


def test_lifetime_never_outlives_the_subject_token(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    reply = sts_gateway.exchange(issuer.mint({"sub": "alice"}, ttl=60))
    assert reply.status == 200, reply.body
    assert reply.body["expires_in"] <= 60
    assert "scope" not in reply.body


def test_policy_refuses_an_audience_of_another_tenant(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    description = refused(sts_gateway.exchange(human(issuer), audience="ledger"), "invalid_target")
    assert "`ledger`" in description and "decision `dec_" in description


def test_resource_is_an_audience(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    reply = sts_gateway.exchange(human(issuer), resource="https://billing.example", requested_token_type=JWT)
    assert reply.status == 200, reply.body
    assert reply.body["issued_token_type"] == JWT
    assert verified(sts_gateway, reply.body["access_token"])["aud"] == "https://billing.example"
    refused(sts_gateway.exchange(human(issuer), resource="billing"), "invalid_target")


def test_forged_subject_token_is_invalid_grant(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    forger = TestIssuer()
    try:
        forged = forger.mint({"iss": issuer.issuer, "sub": "alice"}, header={"kid": issuer.keys[0].kid})
    finally:
        forger.stop()
    description = refused(sts_gateway.exchange(forged), "invalid_grant")
    assert "signature" in description
    unknown = refused(sts_gateway.exchange("not-a-jwt-at-all"), "invalid_grant")
    assert "subject_token" in unknown


def test_bad_grant_type_and_missing_parameters(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    token = human(issuer)
    assert "`password`" in refused(sts_gateway.post({"grant_type": "password"}), "unsupported_grant_type")
    assert "`grant_type`" in refused(sts_gateway.post({"subject_token": token}), "invalid_request")
    no_subject = sts_gateway.post({"grant_type": TOKEN_EXCHANGE, "subject_token_type": ACCESS_TOKEN})
    assert "`subject_token`" in refused(no_subject, "invalid_request")
    no_type = sts_gateway.post({"grant_type": TOKEN_EXCHANGE, "subject_token": token})
    assert "`subject_token_type`" in refused(no_type, "invalid_request")
    saml = sts_gateway.exchange(token, subject_token_type="urn:ietf:params:oauth:token-type:saml2")
    refused(saml, "invalid_request")
    lone_actor = sts_gateway.exchange(token, actor_token=agent(issuer))
    assert "actor_token_type" in refused(lone_actor, "invalid_request")
    twice = sts_gateway.post(
        {"grant_type": TOKEN_EXCHANGE, "subject_token": [token, token], "subject_token_type": ACCESS_TOKEN}
    )
    assert "more than once" in refused(twice, "invalid_request")
    json_body = sts_gateway.post(body=b"{}", headers={"Content-Type": "application/json"})
    refused(json_body, "invalid_request")
    refused(sts_gateway.exchange(token, requested_token_type="urn:x:refresh"), "invalid_request")
    refused(sts_gateway.exchange(token, scope='chat "quoted"'), "invalid_scope")


def test_client_authentication_is_refused_with_401(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    reply = sts_gateway.post(
        {"grant_type": TOKEN_EXCHANGE, "subject_token": human(issuer), "subject_token_type": ACCESS_TOKEN},
        headers={"Authorization": "Basic Y2xpZW50OnNlY3JldA=="},
    )
    refused(reply, "invalid_client", 401)
    assert reply.headers["www-authenticate"].startswith("Basic")
    with_secret = sts_gateway.exchange(human(issuer), client_id="c", client_secret="s3cret-value")
    assert "s3cret" not in refused(with_secret, "invalid_client", 401)


@pytest.mark.parametrize(
    "case",
    ["forged", "scope", "may_act", "audience_is_token", "expired_actor", "resource_is_token"],
)
def test_no_error_echoes_a_token(sts_gateway: StsGateway, issuer: TestIssuer, case: str) -> None:
    subject = human(issuer)
    actor = agent(issuer)
    params: dict[str, str | list[str]] = {}
    if case == "forged":
        subject = subject[:-8] + "AAAAAAAA"
    elif case == "scope":
        params["scope"] = "admin"
    elif case == "may_act":
        subject = human(issuer, may_act={"sub": "someone-else"})
    elif case == "audience_is_token":
        params["audience"] = subject
    elif case == "expired_actor":
        actor = agent(issuer, ttl=-3600)
    elif case == "resource_is_token":
        params["resource"] = "https://x/" + actor
    reply = sts_gateway.exchange(subject, actor, **params)
    assert reply.status in (400, 401), reply.body
    for token in (subject, actor):
        for start in range(0, len(token) - 16, 16):
            assert token[start : start + 16].encode() not in reply.raw


def test_every_exchange_is_on_record_without_its_tokens(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    subject, actor = human(issuer), agent(issuer)
    issued = sts_gateway.exchange(subject, actor)
    assert issued.status == 200
    refused(sts_gateway.exchange("not-a-jwt-at-all"), "invalid_grant")
    records = [r for r in sts_gateway.gateway.records() if r["kind"] == "token_exchange"]
    ok, bad = records[-2], records[-1]
    claims = verified(sts_gateway, issued.body["access_token"])
    assert ok["outcome"] == "ok" and ok["subject"]["id"] == "alice"
    assert [a["id"] for a in ok["actors"]] == ["agent-7"]
    assert ok["issued"]["jti"] == claims["jti"] and ok["issued"]["aud"] == claims["aud"]
    assert ok["decisions"] and all(d["allowed"] for d in ok["decisions"])
    assert bad["outcome"] == "refused" and bad["error"] == {"code": "invalid_grant"} and bad["subject"] is None
    trail = str(records)
    for token in (subject, actor, issued.body["access_token"]):
        assert token.split(".")[2] not in trail


def test_no_token_is_issued_when_the_trail_cannot_record(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    sts_gateway.gateway.app.audit.close()  # the writer stops: nothing more can be recorded
    reply = sts_gateway.exchange(human(issuer), agent(issuer))
    assert reply.status == 503 and reply.body["error"] == "temporarily_unavailable"
    assert "access_token" not in reply.body


def test_a_gateway_token_cannot_be_exchanged_for_an_audience_it_does_not_hold(
    sts_gateway: StsGateway, issuer: TestIssuer
) -> None:
    """Recognised by its `iss`: its subject keeps the first issuer (`sub_id`), which is not the gateway."""
    first = sts_gateway.exchange(human(issuer)).body["access_token"]
    assert verified(sts_gateway, first)["aud"] == "idgate-test"
    other = sts_gateway.exchange(first, audience="https://billing.example")  # the policy would allow it
    assert "its own audiences" in refused(other, "invalid_target")
