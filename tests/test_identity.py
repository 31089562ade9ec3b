"""Identity at the gateway's door, end to end over HTTP.

Real servers on loopback: trusted and untrusted JWKS-serving issuers, a SPIFFE
trust bundle on disk, an upstream, and idgate under uvicorn. Calls go through
the official openai SDK where a token is presented, through `http.client` where
none is. Every refusal is checked four ways: a 401, a `WWW-Authenticate: Bearer`
challenge (`error="invalid_token"` only when a token was presented), an error in
OpenAI's shape that says what was wrong, and an audit record of the refusal that
holds no trace of the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from joserfc import jws, jwt
from joserfc.jwk import ECKey, RSAKey

from tests.conftest import UPSTREAM_KEY, MakeGateway, base_config
from tests.support import Gateway, TestIssuer, Upstream

HMAC_SECRET = "mixed-issuer-shared-secret-0123456789"
MIXED_ISSUER = "urn:test:mixed"
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


# -- the servers ---------------------------------------------------------------------


@dataclass
class Bundle:
    """A SPIFFE trust bundle for `example.org`: one JWT-SVID key, one X.509-SVID key."""

    path: Path
    jwt_key: ECKey
    x509_key: ECKey


def ec_key() -> ECKey:
    key = ECKey.generate_key("P-256", parameters={"use": "sig"})
    key.ensure_kid()
    return key


def rsa_key() -> RSAKey:
    key = RSAKey.generate_key(2048, parameters={"use": "sig"})
    key.ensure_kid()
    return key


@pytest.fixture(scope="module")
def trusted() -> Iterator[TestIssuer]:
    server = TestIssuer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stranger() -> Iterator[TestIssuer]:
    """A working issuer that the gateway does not trust."""
    server = TestIssuer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    jwt_key, x509_key = ec_key(), ec_key()
    path = tmp_path_factory.mktemp("spiffe") / "example.org.bundle.json"
    keys = [
        {**jwt_key.as_dict(private=False), "use": "jwt-svid"},
        {**x509_key.as_dict(private=False), "use": "x509-svid"},
    ]
    path.write_bytes(orjson.dumps({"keys": keys, "spiffe_sequence": 1, "spiffe_refresh_hint": 300}))
    return Bundle(path, jwt_key, x509_key)


@pytest.fixture(scope="module")
def door(
    tmp_path_factory: pytest.TempPathFactory, trusted: TestIssuer, shared_upstream: Upstream, bundle: Bundle
) -> Iterator[Gateway]:
    """One gateway for the refusal tests: each finds its own record by request id."""
    config = base_config(trusted, shared_upstream)
    config["issuers"].append(
        {
            "name": "mixed",
            "issuer": MIXED_ISSUER,
            "jwks_uri": trusted.jwks_uri,
            "algorithms": ["RS256", "HS256"],
            "hmac_secret": {"env": "TEST_HMAC_SECRET"},
            "refetch_interval_seconds": 0,
        }
    )
    config["spiffe"] = [
        {
            "name": "mesh",
            "trust_domain": "example.org",
            "jwks_file": str(bundle.path),
            "tenant": "ops",
            "rules": [{"path_prefix": "/agents", "kind": "agent", "tenant": "acme"}],
        }
    ]
    # Identity is under test here, not policy: a standalone agent must get through.
    config["policy"] = {"files": [str(Path(__file__).parent / "data" / "permit_all.cedar")]}
    env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY, "TEST_HMAC_SECRET": HMAC_SECRET}
    gateway = Gateway(config, tmp_path_factory.mktemp("door"), env)
    yield gateway
    gateway.stop()


# -- calls and what they leave -----------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = orjson.loads(self.body)["error"]
        return error


def raw(gateway: Gateway, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def sdk(gateway: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=10)


def chat(gateway: Gateway, token: str) -> str:
    """A chat call through the SDK that must succeed; its request id."""
    with sdk(gateway, token) as client:
        response = client.chat.completions.with_raw_response.create(**CHAT)
        assert response.parse().choices[0].message.content == "upstream says hi"
        request_id = response.headers["x-request-id"]
    assert isinstance(request_id, str)
    return request_id


def sdk_refusal(gateway: Gateway, token: str, *, models: bool = False) -> Answer:
    """A call through the SDK that the gateway refuses with a 401."""
    with sdk(gateway, token) as client, pytest.raises(openai.AuthenticationError) as caught:
        if models:
            client.models.list()
        else:
            client.chat.completions.create(**CHAT)
    response = caught.value.response
    return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)


def record_of(gateway: Gateway, request_id: str) -> dict[str, Any]:
    records = [r for r in gateway.records() if r["request_id"] == request_id]
    assert len(records) == 1, records
    return records[0]


def assert_nowhere_in_records(gateway: Gateway, secret: str) -> None:
    trail = orjson.dumps(gateway.records()).decode()
    assert secret not in trail
    signature = secret.rsplit(".", 1)[-1]
    if len(signature) >= 16:
        assert signature not in trail


def assert_refused(
    gateway: Gateway, answer: Answer, message: str, *, token: str | None, status: int = 401
) -> dict[str, Any]:
    """The refusal in every form: status, challenge, OpenAI-shaped error, audit record, no leaked token."""
    assert answer.status == status, answer.body
    code = "invalid_token" if token is not None else "missing_token"
    challenge = answer.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="idgate"')
    if token is not None:
        assert 'error="invalid_token"' in challenge and "error_description=" in challenge
    else:
        assert "error=" not in challenge  # RFC 6750 §3.1: no error code when no token was sent
    error = answer.error
    assert {"message", "type", "code", "param", "request_id"} <= error.keys()
    assert (error["type"], error["code"]) == ("authentication_error", code)
    assert message in error["message"], error["message"]
    assert answer.headers["x-request-id"] == error["request_id"]
    record = record_of(gateway, error["request_id"])
    assert (record["status"], record["outcome"]) == (status, "refused")
    assert record["subject"] is None and record["actors"] == [] and record["credential"] is None
    assert record["error"] == {"code": code, "message": error["message"]}
    if token is not None:
        assert token not in answer.headers["www-authenticate"] and token not in error["message"]
        assert_nowhere_in_records(gateway, token)
    return record


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


RS256_HEADER = b64(b'{"alg":"RS256"}')


def claims(issuer: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    body = {"iss": issuer, "sub": "mallory", "aud": "idgate-test", "iat": now, "exp": now + 300, **extra}
    return {k: v for k, v in body.items() if v is not None}


def hand_made(header: dict[str, Any], body: dict[str, Any], secret: bytes | None = None) -> str:
    """A compact JWS built by hand: unsigned, or HMAC-SHA256 with `secret`."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(body))}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def svid(key: ECKey, spiffe_id: str, *, header: dict[str, Any] | None = None, **extra: Any) -> str:
    """A JWT-SVID: `sub` is the SPIFFE ID, no `iss` needed, signed by a bundle key."""
    head = {"alg": "ES256", "kid": key.kid, "typ": "JWT", **(header or {})}
    body = claims("", sub=spiffe_id, **extra)
    del body["iss"]
    return jwt.encode({k: v for k, v in head.items() if v is not None}, body, key)


# -- no token, not a bearer token, not a JWT -------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/chat/completions"), ("GET", "/v1/models")])
def test_no_token(door: Gateway, method: str, path: str) -> None:
    body = orjson.dumps(CHAT) if method == "POST" else None
    answer = raw(door, method, path, {"Content-Type": "application/json"}, body)
    assert_refused(door, answer, "no bearer token; send `Authorization: Bearer TOKEN`", token=None)


def test_basic_credentials_are_not_a_bearer_token(door: Gateway) -> None:
    secret = base64.b64encode(b"alice:correct horse battery staple").decode()
    answer = raw(door, "POST", "/v1/chat/completions", {"Authorization": f"Basic {secret}"}, orjson.dumps(CHAT))
    assert_refused(door, answer, "no bearer token", token=None)
    assert_nowhere_in_records(door, secret)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("sk-not-a-jwt-at-all", "token is not a JWT (expected three `.`-separated parts)"),
        ("only.two-parts", "token is not a JWT"),
        ("one.two.three.four", "token is not a JWT"),
        ("a.eyJzdWIiOiJ4In0.c2ln", "token header is not base64url-encoded JSON"),
        (f"{b64(b'not json at all')}.eyJzdWIiOiJ4In0.c2ln", "token header is not base64url-encoded JSON"),
        (f"{b64(b'[1,2]')}.eyJzdWIiOiJ4In0.c2ln", "token header is not a JSON object"),
        (f"{RS256_HEADER}.{b64(b'plain text')}.c2ln", "token payload is not base64url-encoded JSON"),
    ],
)
def test_malformed_tokens(door: Gateway, token: str, message: str) -> None:
    assert_refused(door, sdk_refusal(door, token), message, token=token)


# -- forged signatures and keys ---------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none(door: Gateway, trusted: TestIssuer, alg: str) -> None:
    token = hand_made({"alg": alg, "typ": "JWT", "kid": trusted.keys[0].kid}, claims(trusted.issuer))
    assert_refused(door, sdk_refusal(door, token), "unsigned tokens (`alg: none`) are not accepted", token=token)


def test_hs256_signed_with_the_issuers_public_key(door: Gateway, trusted: TestIssuer) -> None:
    """The key-confusion attack: HMAC keyed with the RSA public key anyone can download."""
    public_pem = trusted.keys[0].as_pem(private=False)
    header = {"alg": "HS256", "typ": "JWT", "kid": trusted.keys[0].kid}
    token = hand_made(header, claims(trusted.issuer), secret=public_pem)
    assert_refused(door, sdk_refusal(door, token), "algorithm `HS256` is not allowed for issuer `corp`", token=token)
    # An issuer that allows HS256 checks it against its configured secret only, never a key of its JWKS.
    token = hand_made(header, claims(MIXED_ISSUER), secret=public_pem)
    assert_refused(door, sdk_refusal(door, token), "token signature is invalid", token=token)


def test_hs256_with_the_configured_secret_and_rs256_on_the_same_issuer(door: Gateway, trusted: TestIssuer) -> None:
    genuine = hand_made({"alg": "HS256", "typ": "JWT"}, claims(MIXED_ISSUER, sub="svc-hmac"), HMAC_SECRET.encode())
    record = record_of(door, chat(door, genuine))
    assert record["subject"]["id"] == "svc-hmac" and record["credential"]["issuer"] == "mixed"
    rs256 = trusted.mint({"iss": MIXED_ISSUER, "sub": "svc-rsa"})
    assert record_of(door, chat(door, rs256))["subject"]["id"] == "svc-rsa"
    assert_nowhere_in_records(door, HMAC_SECRET)
    assert_nowhere_in_records(door, genuine)


def test_unknown_kid_refetches_the_keys_then_refuses(door: Gateway, trusted: TestIssuer) -> None:
    chat(door, trusted.mint())  # the keys are known
    stray = rsa_key()
    before = trusted.jwks_requests
    token = trusted.mint(key=stray)
    answer = sdk_refusal(door, token)
    assert trusted.jwks_requests > before  # it looked for a rotated key before refusing
    assert_refused(door, answer, f"signing key `{stray.kid}` is not known for issuer `corp`", token=token)


def test_untrusted_issuer(door: Gateway, stranger: TestIssuer) -> None:
    token = stranger.mint()
    message = f"issuer `{stranger.issuer}` is not trusted; trusted issuers: `corp`, `mixed`"
    assert_refused(door, sdk_refusal(door, token), message, token=token)
    assert stranger.jwks_requests == 0  # an untrusted issuer's keys are never fetched


def test_trusted_issuer_claimed_but_signed_by_another_key(
    door: Gateway, trusted: TestIssuer, stranger: TestIssuer
) -> None:
    other = stranger.keys[0]
    token = trusted.mint(key=other)  # iss is the trusted issuer, kid and signature are the stranger's
    assert_refused(door, sdk_refusal(door, token), f"signing key `{other.kid}` is not known", token=token)
    token = trusted.mint(key=other, header={"kid": trusted.keys[0].kid})  # and naming the trusted kid
    assert_refused(door, sdk_refusal(door, token), "token signature is invalid", token=token)


@pytest.mark.parametrize("name", ["jwk", "jku", "x5u", "x5c"])
def test_token_carrying_its_own_key(door: Gateway, trusted: TestIssuer, stranger: TestIssuer, name: str) -> None:
    own = stranger.keys[0]
    value = {
        "jwk": own.as_dict(private=False),
        "jku": stranger.jwks_uri,
        "x5u": f"{stranger.issuer}/cert.pem",
        "x5c": ["MIIBszCCAVmgAwIBAgIUYQ=="],
    }[name]
    before = stranger.jwks_requests
    message = f"tokens that carry their own key (`{name}`) are not accepted"
    for iss in (stranger.issuer, trusted.issuer):
        token = stranger.mint({"iss": iss}, header={name: value})
        assert_refused(door, sdk_refusal(door, token), message, token=token)
    assert stranger.jwks_requests == before  # a `jku` is never followed


# -- claims -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "ttl", "message"),
    [
        ({}, -120, "token has expired"),
        ({"aud": "https://someone-else.example"}, 300, "token audience `https://someone-else.example` is not accepted"),
        ({"aud": None}, 300, "token has no audience (`aud`)"),
        ({"nbf": "+120"}, 300, "token is not valid yet"),
        ({"iat": "+120"}, 300, "token was issued in the future"),
        ({"exp": None}, 300, "token has no expiry (`exp`)"),
    ],
)
def test_bad_claims(door: Gateway, trusted: TestIssuer, extra: dict[str, Any], ttl: int, message: str) -> None:
    now = int(time.time())
    values = {k: now + int(v) if isinstance(v, str) and v.startswith("+") else v for k, v in extra.items()}
    token = trusted.mint(values, ttl=ttl)  # a claim set to None is left out
    assert_refused(door, sdk_refusal(door, token), message, token=token)


def test_bad_claims_on_the_models_endpoint(door: Gateway, trusted: TestIssuer) -> None:
    token = trusted.mint(ttl=-120)
    assert_refused(door, sdk_refusal(door, token, models=True), "token has expired", token=token)


def test_expiry_within_the_clock_skew_is_accepted(door: Gateway, trusted: TestIssuer) -> None:
    token = trusted.mint({"sub": "late-alice", "nbf": int(time.time()) + 30}, ttl=-30)
    record = record_of(door, chat(door, token))
    assert (record["status"], record["outcome"]) == (200, "ok")
    assert record["subject"]["id"] == "late-alice"
    assert record["credential"]["expires_at"] < time.time()


def test_actor_chain_is_recorded_outermost_first(door: Gateway, trusted: TestIssuer) -> None:
    act = {
        "sub": "planner-agent",
        "act": {"sub": "browser-agent", "iss": "https://agents.example", "act": {"sub": "svc"}},
    }
    token = trusted.mint({"sub": "alice", "act": act})
    record = record_of(door, chat(door, token))
    assert record["subject"]["id"] == "alice" and record["subject"]["kind"] == "human"
    assert record["actors"] == [
        {"id": "planner-agent", "kind": "agent", "issuer": None},
        {"id": "browser-agent", "kind": "agent", "issuer": "https://agents.example"},
        {"id": "svc", "kind": "agent", "issuer": None},
    ]
    bad = trusted.mint({"act": {"kind": "agent"}})
    assert_refused(door, sdk_refusal(door, bad), "claim `act` must be an object with a `sub` string", token=bad)


# -- SPIFFE JWT-SVIDs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spiffe_id", "kind", "tenant"),
    [
        ("spiffe://example.org/agents/a1", "agent", "acme"),
        ("spiffe://example.org/agentsmith", "service", "ops"),  # `/agents` covers whole segments only
        ("spiffe://example.org/ns/prod/sa/web", "service", "ops"),
    ],
)
def test_jwt_svid_is_accepted_and_mapped(door: Gateway, bundle: Bundle, spiffe_id: str, kind: str, tenant: str) -> None:
    record = record_of(door, chat(door, svid(bundle.jwt_key, spiffe_id)))
    assert record["subject"] == {
        "kind": kind,
        "id": spiffe_id,
        "tenant": tenant,
        "issuer": "spiffe://example.org",
        "groups": [],
    }
    assert record["credential"]["kind"] == "jwt-svid" and record["credential"]["issuer"] == "mesh"


def test_jwt_svid_refusals(door: Gateway, bundle: Bundle) -> None:
    good = "spiffe://example.org/agents/a1"
    cases = [
        (svid(bundle.jwt_key, "spiffe://evil.org/agents/a1"), "SPIFFE trust domain `evil.org` is not trusted"),
        (svid(bundle.jwt_key, good, aud=None), "token has no audience (`aud`)"),
        (svid(bundle.jwt_key, good, header={"kid": None}), "JWT-SVID header has no `kid`"),
        (svid(bundle.x509_key, good), f"signing key `{bundle.x509_key.kid}` is not known for issuer `mesh`"),
        (svid(ec_key(), good), "is not known for issuer `mesh`"),
    ]
    for token, message in cases:
        assert_refused(door, sdk_refusal(door, token), message, token=token)


# -- key rotation, fetch failures, the verified-token cache ----------------------------------


def test_rotation(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifications = count_verifications(monkeypatch)
    gateway = make_gateway(base_config(issuer, upstream))
    old_key = issuer.keys[0]
    old = issuer.mint({"sub": "before"})
    chat(gateway, old)
    chat(gateway, old)
    assert issuer.jwks_requests == 1
    assert verifications() == 1  # the second call was served from the verified-token cache

    issuer.rotate()  # the old key is withdrawn
    new = issuer.mint({"sub": "after"})
    assert record_of(gateway, chat(gateway, new))["subject"]["id"] == "after"
    assert issuer.jwks_requests == 2  # exactly one refetch found the new key
    chat(gateway, new)
    assert issuer.jwks_requests == 2

    message = f"signing key `{old_key.kid}` is not known for issuer `corp`"
    assert_refused(gateway, sdk_refusal(gateway, old), message, token=old)  # cached before rotation
    fresh_old = issuer.mint({"sub": "before"}, key=old_key)
    assert_refused(gateway, sdk_refusal(gateway, fresh_old), message, token=fresh_old)


def test_rotation_ends_a_cached_token_without_kid(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    gateway = make_gateway(base_config(issuer, upstream))
    old_key = issuer.keys[0]
    now = int(time.time())
    body = {"iss": issuer.issuer, "sub": "no-kid", "aud": "idgate-test", "iat": now, "exp": now + 300}
    old = jwt.encode({"alg": "RS256", "typ": "JWT"}, body, old_key)  # one key published: `kid` may be left out
    chat(gateway, old)
    issuer.rotate()
    chat(gateway, issuer.mint())  # the new key's kid refetches the set; the old key is gone
    assert_refused(gateway, sdk_refusal(gateway, old), "token signature is invalid", token=old)


def test_rotation_keeping_the_old_key(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream) -> None:
    gateway = make_gateway(base_config(issuer, upstream))
    old = issuer.mint()
    chat(gateway, old)
    issuer.rotate(keep_old=True)
    chat(gateway, issuer.mint())
    chat(gateway, issuer.mint({"sub": "x"}, key=issuer.keys[1]))  # still published, still good
    chat(gateway, old)


class Doomed:
    """An issuer the test stops itself (and the fixture stops, if the test did not get that far)."""

    def __init__(self) -> None:
        self.issuer = TestIssuer()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.issuer.stop()


@pytest.fixture
def doomed() -> Iterator[Doomed]:
    server = Doomed()
    yield server
    server.stop()


def test_unreachable_keys_never_allow(make_gateway: MakeGateway, doomed: Doomed, upstream: Upstream) -> None:
    gateway = make_gateway(base_config(doomed.issuer, upstream))  # a fresh gateway: no keys known yet
    token = doomed.issuer.mint()
    doomed.stop()
    for _ in range(2):
        with sdk(gateway, token) as client, pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**CHAT)
        response = caught.value.response
        assert response.status_code in (401, 503)
        error = orjson.loads(response.content)["error"]
        assert error["message"] == "keys of issuer `corp` are not available"
        record = record_of(gateway, error["request_id"])
        assert record["status"] == response.status_code and record["outcome"] != "ok" and record["subject"] is None
    assert upstream.received == []
    assert_nowhere_in_records(gateway, token)


def test_a_failed_refetch_keeps_the_known_keys_and_refuses_new_ones(
    make_gateway: MakeGateway, doomed: Doomed, upstream: Upstream
) -> None:
    issuer = doomed.issuer
    gateway = make_gateway(base_config(issuer, upstream))
    chat(gateway, issuer.mint({"sub": "known"}))
    issuer.rotate(keep_old=True)
    unseen = issuer.mint({"sub": "unseen"})
    doomed.stop()
    message = f"signing key `{issuer.keys[0].kid}` is not known for issuer `corp`"
    assert_refused(gateway, sdk_refusal(gateway, unseen), message, token=unseen)
    chat(gateway, issuer.mint({"sub": "known-2"}, key=issuer.keys[1]))  # keys already known stay in use


def count_verifications(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count signature verifications in this process (the gateway runs in a thread of it)."""
    calls = [0]
    real = jws.deserialize_compact

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jws, "deserialize_compact", counting)
    return lambda: calls[0]
