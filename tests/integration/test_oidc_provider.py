"""A human signed in at a real OpenID provider, an agent with a SPIFFE JWT-SVID, one gateway token.

The provider is npm `oidc-provider` (tests/peers/oidc), started on a free
loopback port; alice signs in to its `chat-app` client with the authorization
code flow and PKCE, asking for the gateway as the resource, and gets a JWT access
token (`aud` the gateway, `scope` what she consented to). idgate trusts the
provider by discovery and the agent's trust domain by a JWKS bundle file. The
agent exchanges alice's token, with its own JWT-SVID as the actor token, for a
gateway token (RFC 8693), calls chat completions with the official openai SDK,
and the audit trail names alice (at the provider) as the subject and the agent's
SPIFFE ID as the actor — and holds neither token.

Until tasks can be started at the gateway, the agent's SVID carries the task it
runs (`task`): the demo policy lets an agent use a model only for a human's task.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import openai
import orjson
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, KeySetSerialization

from idgate.sts.exchange import ACCESS_TOKEN, ID_TOKEN, JWT
from tests.conftest import UPSTREAM_KEY, MakeGateway
from tests.integration.oidc_peer import GATEWAY_RESOURCE, OTHER_RESOURCE, OidcProvider
from tests.support import Gateway, Upstream

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TRUST_DOMAIN = "agents.example"
AGENT = f"spiffe://{TRUST_DOMAIN}/agents/research-bot"
TASK = "task-quarterly-report"
GATEWAY_AUDIENCE = "idgate-test"  # the gateway's own audience: of the SVID and of the tokens it issues

ENTITIES = """
entitlements:
  - tenant: acme
    models: [gpt-test]
    audiences: [idgate-test]
"""


@dataclass(frozen=True)
class Agent:
    key: ECKey
    bundle: Path

    def svid(self, spiffe_id: str = AGENT, ttl: int = 300, **claims: Any) -> str:
        """A JWT-SVID for `spiffe_id`, signed with the trust domain's JWT-SVID key."""
        now = int(time.time())
        body = {"sub": spiffe_id, "aud": [GATEWAY_AUDIENCE], "iat": now, "exp": now + ttl, **claims}
        return jwt.encode({"alg": "ES256", "kid": self.key.kid, "typ": "JWT"}, body, self.key)


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    key = ECKey.generate_key("P-256", parameters={"use": "sig"})
    key.ensure_kid()
    bundle = tmp_path / f"{TRUST_DOMAIN}.bundle.json"
    keys = [{**key.as_dict(private=False), "use": "jwt-svid"}]
    bundle.write_bytes(orjson.dumps({"keys": keys, "spiffe_sequence": 1}))
    return Agent(key, bundle)


@pytest.fixture
def gateway(
    make_gateway: MakeGateway, oidc_provider: OidcProvider, agent: Agent, upstream: Upstream, tmp_path: Path
) -> Gateway:
    entities = tmp_path / "entities.yaml"
    entities.write_text(ENTITIES)
    config = {
        "issuers": [
            {
                "name": "corp-idp",
                "issuer": oidc_provider.issuer,
                "discovery": True,
                "audiences": [GATEWAY_RESOURCE],  # the resource indicator alice's app asks for
                "claims": {"default_tenant": "acme"},  # the provider has no tenant claim; kind: human by default
            }
        ],
        "spiffe": [
            {
                "name": "mesh",
                "trust_domain": TRUST_DOMAIN,
                "jwks_file": str(agent.bundle),
                "tenant": "acme",
                "rules": [{"path_prefix": "/agents", "kind": "agent"}],
            }
        ],
        "providers": [
            {"name": "up", "type": "openai", "base_url": upstream.url, "api_key": {"env": "TEST_UPSTREAM_KEY"}}
        ],
        "models": [{"name": "gpt-test", "provider": "up", "upstream_model": "real-model"}],
        "policy": {"entities": [str(entities)]},
    }
    return make_gateway(config)


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


def exchange(gateway: Gateway, subject: str, subject_type: str = ACCESS_TOKEN, **params: str) -> Reply:
    form = {"grant_type": TOKEN_EXCHANGE, "subject_token": subject, "subject_token_type": subject_type, **params}
    request = urllib.request.Request(
        f"{gateway.url}/oauth2/token",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(response.status, orjson.loads(response.read()))
    except urllib.error.HTTPError as error:
        return Reply(error.code, orjson.loads(error.read()))


def gateway_claims(gateway: Gateway, token: str) -> dict[str, Any]:
    """The issued token's claims, verified with the keys the gateway publishes."""
    with urllib.request.urlopen(f"{gateway.url}/.well-known/jwks.json", timeout=10) as response:
        keys = KeySet.import_key_set(cast(KeySetSerialization, orjson.loads(response.read())))
    claims: dict[str, Any] = jwt.decode(token, keys, algorithms=["ES256", "RS256"]).claims
    return claims


def records_of(gateway: Gateway, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The audit records of one request that name who made it (each must say the same)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in gateway.records() if r.get("request_id") == request_id and r.get("subject")]
        if found or time.monotonic() > deadline:
            assert found, f"no audit record names the caller of {request_id}"
            return found
        time.sleep(0.02)


def test_human_from_a_real_openid_provider_and_a_spiffe_agent(
    gateway: Gateway, oidc_provider: OidcProvider, agent: Agent, upstream: Upstream
) -> None:
    assert oidc_provider.discovery()["issuer"] == oidc_provider.issuer
    alice = oidc_provider.sign_in("alice")
    assert alice.token_type == "Bearer" and alice.scope == "chat models:read"
    actor_token = agent.svid(task=TASK)

    reply = exchange(gateway, alice.access_token, actor_token=actor_token, actor_token_type=JWT, scope="chat")
    assert reply.status == 200, reply.body
    assert reply.body["issued_token_type"] == ACCESS_TOKEN and reply.body["scope"] == "chat"
    token = reply.body["access_token"]
    claims = gateway_claims(gateway, token)
    assert claims["iss"] == gateway.url and claims["aud"] == GATEWAY_AUDIENCE
    assert claims["sub"] == "alice"
    assert claims["sub_id"] == {"format": "iss_sub", "iss": oidc_provider.issuer, "sub": "alice"}
    assert claims["act"]["sub"] == AGENT and claims["act"]["kind"] == "agent" and "act" not in claims["act"]
    assert claims["scope"] == "chat" and claims["task"] == TASK and claims["tenant"] == "acme"
    assert claims["exp"] <= time.time() + 300

    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=10) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "summarise the quarter"}]
        )
    assert raw.parse().choices[0].message.content == "upstream says hi"
    forwarded = upstream.received[-1]
    assert forwarded["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"  # no token passthrough
    assert forwarded["body"]["user"].startswith("idg_")

    for record in records_of(gateway, raw.headers["x-request-id"]):
        subject = record["subject"]
        assert (subject["id"], subject["issuer"], subject["kind"]) == ("alice", oidc_provider.issuer, "human")
        assert [(a["id"], a["kind"]) for a in record["actors"]] == [(AGENT, "agent")]
        if record.get("credential"):
            assert record["credential"]["issuer"] == "idgate"  # the call was made with the exchanged token
    exchanges = [r for r in gateway.records() if r.get("kind") == "token_exchange"]
    assert len(exchanges) == 1
    assert exchanges[0]["subject"]["id"] == "alice" and exchanges[0]["subject"]["issuer"] == oidc_provider.issuer
    assert [a["id"] for a in exchanges[0]["actors"]] == [AGENT]
    trail = orjson.dumps(gateway.records()).decode()
    for secret in (alice.access_token, alice.id_token, actor_token, token):
        assert secret.rsplit(".", 1)[-1] not in trail


def test_tokens_the_provider_issued_for_another_audience_are_refused(
    gateway: Gateway, oidc_provider: OidcProvider, agent: Agent
) -> None:
    elsewhere = oidc_provider.sign_in("alice", resource=OTHER_RESOURCE, scope="chat")
    actor = {"actor_token": agent.svid(task=TASK), "actor_token_type": JWT}
    for subject, subject_type in ((elsewhere.access_token, ACCESS_TOKEN), (elsewhere.id_token, ID_TOKEN)):
        reply = exchange(gateway, subject, subject_type, **actor)
        assert reply.status == 400, reply.body
        assert reply.body["error"] == "invalid_grant"
        assert "audience" in reply.body["error_description"], reply.body
        assert subject.rsplit(".", 1)[-1] not in reply.body["error_description"]
    with (
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=elsewhere.access_token, max_retries=0) as client,
        pytest.raises(openai.AuthenticationError) as refused,
    ):
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert "audience" in str(refused.value)
    # The same person, signed in for the gateway, is accepted: only the audience was wrong.
    assert exchange(gateway, oidc_provider.sign_in("alice").access_token, **actor).status == 200
