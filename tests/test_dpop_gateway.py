"""DPoP-bound tokens at the gateway's API: every call proves the key, with the official openai SDK.

A token comes from the gateway's own token service with a DPoP proof (so it
carries `cnf.jkt`); each call then sends `Authorization: DPoP TOKEN` and a fresh
proof. Each way a proof can be wrong is refused with 401 and a `DPoP` challenge,
and a proof replayed to a second gateway process sharing the state folder is
refused there too.
"""

from __future__ import annotations

import http.client
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx2
import openai
import orjson
import pytest

from idgate.sts.keys import KEYS_FILE
from tests.conftest import UPSTREAM_KEY, MakeGateway, base_config
from tests.dpop_client import DPoPKey
from tests.support import Gateway, RawResponse, TestIssuer, Upstream

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
CHAT = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
PUBLIC_URL = "http://gateway.test"  # both gateways' public URL: what `htu` names
REDIS_URL = "redis://127.0.0.1:6379/0"

BOUND_POLICY = """
@id("entitled-model")
permit (principal, action == Action::"invoke_model", resource)
when { principal in resource.entitlements };

@id("entitled-audience")
permit (principal, action == Action::"exchange_token", resource)
when { principal in resource.entitlements };

// `gpt-test` only with a sender-constrained token (DPoP or mTLS), never a plain bearer token.
@id("gpt-test-needs-a-bound-token")
@reason("binding")
forbid (principal, action == Action::"invoke_model", resource == Model::"gpt-test")
unless { context.binding != "bearer" };
"""


def send(
    gateway: Gateway, path: str, headers: list[tuple[str, str]], body: bytes | None = CHAT, method: str = "POST"
) -> RawResponse:
    """One request with headers exactly as listed (a name may repeat)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.putrequest(method, path)
        named = {name.lower() for name, _ in headers}
        defaults = [("Content-Type", "application/json")] if "content-type" not in named else []
        for name, value in [*defaults, *headers]:
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        response = connection.getresponse()
        return RawResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def bound_token(gateway: Gateway, issuer: TestIssuer, key: DPoPKey, base: str | None = None) -> str:
    """A gateway token bound to `key`, from the token endpoint (with a proof for it)."""
    form = urlencode(
        {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": issuer.mint({"sub": "alice", "kind": "human"}),
            "subject_token_type": ACCESS_TOKEN,
        }
    ).encode()
    proof = key.proof("POST", f"{base or gateway.url}/oauth2/token")
    headers = [("Content-Type", "application/x-www-form-urlencoded"), ("DPoP", proof)]
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.putrequest("POST", "/oauth2/token")
        for name, value in [*headers, ("Content-Length", str(len(form)))]:
            connection.putheader(name, value)
        connection.endheaders(form)
        reply = orjson.loads(connection.getresponse().read())
    finally:
        connection.close()
    assert reply["token_type"] == "DPoP", reply
    token: str = reply["access_token"]
    return token


@pytest.fixture
def dpop_gateway(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream) -> Gateway:
    return make_gateway(base_config(issuer, upstream))


@pytest.fixture
def client_key() -> DPoPKey:
    return DPoPKey()


def assert_dpop_refusal(reply: RawResponse, error: str, words: str) -> None:
    assert reply.status == 401, reply.body
    challenge = reply.headers["www-authenticate"]
    assert challenge.startswith("DPoP "), challenge
    assert f'error="{error}"' in challenge and 'algs="ES256' in challenge, challenge
    assert "resource_metadata=" in challenge
    body = orjson.loads(reply.body)["error"]
    assert body["code"] == error and words in body["message"], body


def test_a_correct_proof_per_call_passes_with_the_openai_sdk(
    dpop_gateway: Gateway, issuer: TestIssuer, client_key: DPoPKey, upstream: Upstream
) -> None:
    token = bound_token(dpop_gateway, issuer, client_key)
    proofs: list[str] = []

    def prove(request: httpx2.Request) -> None:
        # What a DPoP client adds to each request: the DPoP scheme and a fresh proof for this method and URL.
        url = str(request.url.copy_with(query=None))
        proofs.append(client_key.proof(request.method, url, token=token))
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = proofs[-1]

    http_client = httpx2.Client(event_hooks={"request": [prove]})
    with openai.OpenAI(
        base_url=f"{dpop_gateway.url}/v1", api_key="unused", max_retries=0, http_client=http_client
    ) as sdk:
        for text in ("hi", "again"):
            reply = sdk.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": text}])
            assert reply.choices[0].message.content == "upstream says hi"
        assert [m.id for m in sdk.models.list()]
        stream = sdk.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "s"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "the upstream says hello"
    assert len(set(proofs)) == 4
    seen = str(upstream.received)
    assert (
        token not in seen
        and proofs[0] not in seen
        and upstream.received[-1]["headers"]["Authorization"] == (f"Bearer {UPSTREAM_KEY}")
    )
    record = dpop_gateway.records()[-1]
    assert record["credential"]["binding"] == "dpop"
    assert token not in str(dpop_gateway.raw_records()) and proofs[-1] not in str(dpop_gateway.raw_records())


def test_each_wrong_proof_is_refused(dpop_gateway: Gateway, issuer: TestIssuer, client_key: DPoPKey) -> None:
    token = bound_token(dpop_gateway, issuer, client_key)
    url = f"{dpop_gateway.url}/v1/chat/completions"
    auth = ("Authorization", f"DPoP {token}")

    def refused(headers: list[tuple[str, str]], error: str, words: str) -> None:
        assert_dpop_refusal(send(dpop_gateway, "/v1/chat/completions", headers), error, words)

    refused([auth], "invalid_dpop_proof", "send a `DPoP` proof")  # missing proof
    refused([auth, ("DPoP", DPoPKey().proof("POST", url, token=token))], "invalid_dpop_proof", "another key")
    wrong_htu = client_key.proof("POST", f"{dpop_gateway.url}/v1/embeddings", token=token)
    refused([auth, ("DPoP", wrong_htu)], "invalid_dpop_proof", "`htu`")
    refused([auth, ("DPoP", client_key.proof("GET", url, token=token))], "invalid_dpop_proof", "`htm` must be `POST`")
    stale = client_key.proof("POST", url, token=token, iat=time.time() - 300)
    refused([auth, ("DPoP", stale)], "invalid_dpop_proof", "`iat`")
    refused([auth, ("DPoP", client_key.proof("POST", url))], "invalid_dpop_proof", "no `ath`")
    wrong_ath = client_key.proof("POST", url, token=token + "x")
    refused([auth, ("DPoP", wrong_ath)], "invalid_dpop_proof", "`ath` does not match")
    two = [
        auth,
        ("DPoP", client_key.proof("POST", url, token=token)),
        ("DPoP", client_key.proof("POST", url, token=token)),
    ]
    refused(two, "invalid_dpop_proof", "exactly one `DPoP` header")
    as_bearer = [("Authorization", f"Bearer {token}"), ("DPoP", client_key.proof("POST", url, token=token))]
    refused(as_bearer, "invalid_token", "DPoP-bound")
    good = client_key.proof("POST", url, token=token)
    assert send(dpop_gateway, "/v1/chat/completions", [auth, ("DPoP", good)]).status == 200
    refused([auth, ("DPoP", good)], "invalid_dpop_proof", "used before")  # replayed `jti`
    records = [r for r in dpop_gateway.records() if r.get("status") == 401]
    assert len(records) == 10 and token not in str(dpop_gateway.raw_records())


def test_an_unbound_token_with_the_dpop_scheme_is_refused_and_bearer_still_works(
    dpop_gateway: Gateway, issuer: TestIssuer, client_key: DPoPKey
) -> None:
    plain = issuer.mint({"sub": "alice"})
    url = f"{dpop_gateway.url}/v1/chat/completions"
    headers = [("Authorization", f"DPoP {plain}"), ("DPoP", client_key.proof("POST", url, token=plain))]
    assert_dpop_refusal(send(dpop_gateway, "/v1/chat/completions", headers), "invalid_token", "not DPoP-bound")
    assert send(dpop_gateway, "/v1/chat/completions", [("Authorization", f"Bearer {plain}")]).status == 200


def test_nonces_at_the_api_when_required(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, client_key: DPoPKey
) -> None:
    config = base_config(issuer, upstream)
    config["sts"] = {"dpop": {"require_nonce": True}}
    gateway = make_gateway(config)
    token_url = f"{gateway.url}/oauth2/token"
    form = urlencode(
        {"grant_type": TOKEN_EXCHANGE, "subject_token": issuer.mint(), "subject_token_type": ACCESS_TOKEN}
    ).encode()
    form_headers = [("Content-Type", "application/x-www-form-urlencoded")]
    first = send(gateway, "/oauth2/token", [*form_headers, ("DPoP", client_key.proof("POST", token_url))], form)
    assert orjson.loads(first.body)["error"] == "use_dpop_nonce"
    nonce = first.headers["dpop-nonce"]
    reply = send(
        gateway, "/oauth2/token", [*form_headers, ("DPoP", client_key.proof("POST", token_url, nonce=nonce))], form
    )
    token = orjson.loads(reply.body)["access_token"]
    url = f"{gateway.url}/v1/chat/completions"
    auth = ("Authorization", f"DPoP {token}")
    without = send(gateway, "/v1/chat/completions", [auth, ("DPoP", client_key.proof("POST", url, token=token))])
    assert_dpop_refusal(without, "use_dpop_nonce", "nonce")
    fresh = without.headers["dpop-nonce"]
    proof = client_key.proof("POST", url, token=token, nonce=fresh)
    assert send(gateway, "/v1/chat/completions", [auth, ("DPoP", proof)]).status == 200


@pytest.fixture(params=["sqlite", "redis"])
def twin_gateways(
    request: pytest.FixtureRequest, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateways (separate servers, caches and connections): workers sharing one state folder (`sqlite`),
    or replicas with state folders of their own sharing the replay cache on Redis (and the signing keys)."""
    config: dict[str, Any] = base_config(issuer, upstream)
    config["server"] = {"public_url": PUBLIC_URL}
    env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    homes = (tmp_path / "shared", tmp_path / "shared")
    if request.param == "redis":
        prefix = f"idgate-test:{secrets.token_hex(6)}:"
        config["sts"] = {"replay_cache": {"backend": "redis", "redis_url": REDIS_URL, "redis_prefix": prefix}}
        homes = (tmp_path / "replica-a", tmp_path / "replica-b")
    first = Gateway(config, homes[0], env)
    if homes[1] != homes[0]:
        homes[1].mkdir()
        keys = homes[1] / KEYS_FILE
        shutil.copyfile(homes[0] / KEYS_FILE, keys)  # replicas share the signing keys (a secret, deployed to each)
        keys.chmod(0o600)
    second = Gateway(config, homes[1], env)
    yield first, second
    first.stop()
    second.stop()


def test_a_proof_replayed_to_another_gateway_is_refused(
    twin_gateways: tuple[Gateway, Gateway], issuer: TestIssuer, client_key: DPoPKey
) -> None:
    first, second = twin_gateways
    token = bound_token(first, issuer, client_key, base=PUBLIC_URL)
    url = f"{PUBLIC_URL}/v1/chat/completions"  # the public URL both serve under (behind one name)
    auth = ("Authorization", f"DPoP {token}")
    proof = client_key.proof("POST", url, token=token)
    assert send(first, "/v1/chat/completions", [auth, ("DPoP", proof)]).status == 200
    assert_dpop_refusal(
        send(second, "/v1/chat/completions", [auth, ("DPoP", proof)]), "invalid_dpop_proof", "used before"
    )
    fresh = client_key.proof("POST", url, token=token)
    assert send(second, "/v1/chat/completions", [auth, ("DPoP", fresh)]).status == 200  # the token is good there
    direct = client_key.proof("POST", f"{first.url}/v1/chat/completions", token=token)  # the server's own address
    assert_dpop_refusal(send(first, "/v1/chat/completions", [auth, ("DPoP", direct)]), "invalid_dpop_proof", "`htu`")
    assert urlsplit(first.config.server.url).netloc == "gateway.test"


def test_a_policy_can_require_a_bound_token(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path, client_key: DPoPKey
) -> None:
    policy = tmp_path / "bound.cedar"
    policy.write_text(BOUND_POLICY)
    config = base_config(issuer, upstream)
    config["policy"] = {"files": [str(policy)]}
    gateway = make_gateway(config)
    plain = issuer.mint({"sub": "alice"})
    refused = send(gateway, "/v1/chat/completions", [("Authorization", f"Bearer {plain}")])
    assert refused.status == 403, refused.body
    assert orjson.loads(refused.body)["error"]["message"].find("binding") >= 0
    token = bound_token(gateway, issuer, client_key)
    url = f"{gateway.url}/v1/chat/completions"
    proof = client_key.proof("POST", url, token=token)
    allowed = send(gateway, "/v1/chat/completions", [("Authorization", f"DPoP {token}"), ("DPoP", proof)])
    assert allowed.status == 200, allowed.body
    record = gateway.records()[-1]
    assert record["credential"]["binding"] == "dpop"
