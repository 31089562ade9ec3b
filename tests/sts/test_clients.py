"""Clients without secrets: `private_key_jwt` (RFC 7523) and JWT-SVIDs at the token endpoint.

Grants: `client_credentials` (a client's own token), the JWT bearer grant
(RFC 7523 §2.1), and DPoP binding of both. The official `mcp` SDK's
`PrivateKeyJWTOAuthProvider` gets a token through discovery alone.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx2
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, KeySetSerialization, OctKey
from mcp.client.auth import TokenStorage
from mcp.client.auth.extensions.client_credentials import (
    PrivateKeyJWTOAuthProvider,
    SignedJWTParameters,
    static_assertion_provider,
)
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from idgate.config import parse_config
from idgate.errors import ConfigError
from tests.conftest import MakeGateway, base_config
from tests.dpop_client import DPoPKey, client_assertion, svid
from tests.sts.conftest import Reply, StsGateway
from tests.support import TestIssuer, Upstream, raw_request

ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SPIFFE_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
OAUTH_ERRORS = {
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_target",
    "invalid_dpop_proof",
    "use_dpop_nonce",
}


def ec_key() -> ECKey:
    key = ECKey.generate_key("P-256", parameters={"use": "sig"})
    key.ensure_kid()
    return key


ADMIN = "root"
CLIENT_KEY = ec_key()
FILE_CLIENT_KEY = ec_key()
BUNDLE_KEY = ec_key()
IMPOSTOR_KEY = ECKey.generate_key("P-256", parameters={"use": "sig", "kid": str(CLIENT_KEY.kid)})


@pytest.fixture
def clients_gateway(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path) -> StsGateway:
    jwks_file = tmp_path / "reporter.jwks.json"
    jwks_file.write_bytes(orjson.dumps({"keys": [FILE_CLIENT_KEY.as_dict(private=False)]}))
    bundle = tmp_path / "example.org.bundle.json"
    bundle.write_bytes(orjson.dumps({"keys": [{**BUNDLE_KEY.as_dict(private=False), "use": "jwt-svid"}]}))
    config = base_config(issuer, upstream)
    config["spiffe"] = [{"name": "mesh", "trust_domain": "example.org", "jwks_file": str(bundle), "tenant": "acme"}]
    config["sts"] = {
        "clients": [
            {
                "client_id": "billing-svc",
                "jwks": {"keys": [CLIENT_KEY.as_dict(private=False)]},
                "kind": "service",
                "tenant": "acme",
                "scope": ["chat", "models:read"],
            },
            {"client_id": "reporter", "jwks_file": str(jwks_file), "kind": "agent", "tenant": "acme"},
            {
                "client_id": "spiffe://example.org/agents/planner",
                "kind": "agent",
                "tenant": "acme",
                "scope": ["chat"],
            },
        ]
    }
    config["admin"] = {"subjects": [f"corp:{ADMIN}"]}  # the kill switch (`POST /admin/revoke`)
    gateway = make_gateway(config)
    return StsGateway(gateway, None)  # type: ignore[arg-type]


def claims_of(gateway: StsGateway, token: str) -> dict[str, Any]:
    keys = KeySet.import_key_set(cast(KeySetSerialization, orjson.loads(gateway.get("/.well-known/jwks.json").raw)))
    claims: dict[str, Any] = jwt.decode(token, keys).claims
    return claims


def credentials(gateway: StsGateway, assertion: str, headers: dict[str, str] | None = None, **params: str) -> Reply:
    form: dict[str, str | list[str]] = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION,
        "client_assertion": assertion,
    }
    return gateway.post({**form, **params}, headers=headers)


def refused(reply: Reply, error: str, status: int = 400) -> str:
    assert (reply.status, reply.body.get("error")) == (status, error), reply.body
    assert reply.headers["cache-control"] == "no-store"
    description: str = reply.body["error_description"]
    return description


# -- private_key_jwt + client_credentials ------------------------------------------------------


def test_a_client_gets_its_own_token_with_private_key_jwt(clients_gateway: StsGateway) -> None:
    url = clients_gateway.url
    for audience in (url, f"{url}/", f"{url}/oauth2/token", ["https://other.example", url]):
        reply = credentials(clients_gateway, client_assertion(CLIENT_KEY, "billing-svc", audience))
        assert reply.status == 200, reply.body
        assert reply.body["token_type"] == "Bearer" and reply.body["scope"] == "chat models:read"
    claims = claims_of(clients_gateway, reply.body["access_token"])
    assert claims["sub"] == "billing-svc" and claims["client_id"] == "billing-svc"
    assert claims["kind"] == "service" and claims["tenant"] == "acme" and claims["aud"] == "idgate-test"
    assert claims["exp"] - claims["iat"] == 300 and "act" not in claims
    # The token works at the API, as the client.
    models = clients_gateway.gateway
    from tests.support import raw_request

    answer = raw_request(
        models.url, "GET", "/v1/models", headers={"Authorization": f"Bearer {reply.body['access_token']}"}
    )
    assert answer.status == 200, answer.body
    narrower = credentials(clients_gateway, client_assertion(CLIENT_KEY, "billing-svc", url), scope="chat")
    assert narrower.body["scope"] == "chat"
    from_file = credentials(clients_gateway, client_assertion(FILE_CLIENT_KEY, "reporter", url))
    assert from_file.status == 200 and "scope" not in from_file.body, from_file.body
    assert claims_of(clients_gateway, from_file.body["access_token"])["kind"] == "agent"


def test_a_client_gets_no_more_than_it_is_registered_for(clients_gateway: StsGateway) -> None:
    url = clients_gateway.url
    wider = credentials(clients_gateway, client_assertion(CLIENT_KEY, "billing-svc", url), scope="chat admin")
    assert "`admin`" in refused(wider, "invalid_scope")
    other = credentials(clients_gateway, client_assertion(CLIENT_KEY, "billing-svc", url), audience="https://x.example")
    refused(other, "invalid_target")


def _forge(key: ECKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    def b64(value: Any) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(claims)}.{b64('sig')}"


def _now_claims(url: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": "billing-svc", "sub": "billing-svc", "aud": url, "iat": now, "exp": now + 60, "jti": "j", **extra}
    return {k: v for k, v in claims.items() if v is not None}


BAD_ASSERTIONS: dict[str, tuple[Callable[[str], str], str]] = {
    "another key": (lambda url: client_assertion(ec_key(), "billing-svc", url), "is not known"),
    "another key, same kid": (lambda url: client_assertion(IMPOSTOR_KEY, "billing-svc", url), "signature is invalid"),
    "expired": (lambda url: client_assertion(CLIENT_KEY, "billing-svc", url, ttl=-120), "has expired"),
    "wrong aud": (lambda url: client_assertion(CLIENT_KEY, "billing-svc", "https://elsewhere"), "audience must be"),
    "lives too long": (lambda url: client_assertion(CLIENT_KEY, "billing-svc", url, ttl=3600), "must expire within"),
    "no jti": (
        lambda url: jwt.encode({"alg": "ES256", "kid": CLIENT_KEY.kid}, _now_claims(url, jti=None), CLIENT_KEY),
        "no valid `jti`",
    ),
    "iss is not sub": (lambda url: client_assertion(CLIENT_KEY, "billing-svc", url, sub="someone"), "`sub` equal"),
    "unregistered": (lambda url: client_assertion(CLIENT_KEY, "stranger", url), "not registered"),
    "hmac": (
        lambda url: jwt.encode({"alg": "HS256"}, _now_claims(url), OctKey.import_key(b"x" * 32)),
        "algorithm `HS256` is not allowed",
    ),
    "none": (lambda url: _forge(CLIENT_KEY, {"alg": "none"}, _now_claims(url)), "algorithm `none` is not allowed"),
    "embedded key": (
        lambda url: jwt.encode(
            {"alg": "ES256", "jwk": CLIENT_KEY.as_dict(private=False)}, _now_claims(url), CLIENT_KEY
        ),
        "must not carry its own key",
    ),
    "not a jwt": (lambda url: "abc.def", "not a JWT"),
}


@pytest.mark.parametrize("case", sorted(BAD_ASSERTIONS))
def test_a_bad_client_assertion_is_invalid_client(clients_gateway: StsGateway, case: str) -> None:
    make, words = BAD_ASSERTIONS[case]
    assertion = make(clients_gateway.url)
    reply = credentials(clients_gateway, assertion)
    description = refused(reply, "invalid_client", 401)
    assert words in description, description
    assert assertion[:24] not in reply.raw.decode() and assertion.split(".")[-1][:12] not in description


def test_a_replayed_client_assertion_is_refused(clients_gateway: StsGateway) -> None:
    assertion = client_assertion(CLIENT_KEY, "billing-svc", clients_gateway.url)
    assert credentials(clients_gateway, assertion).status == 200
    assert "used before" in refused(credentials(clients_gateway, assertion), "invalid_client", 401)


def test_secrets_are_refused_and_never_echoed(clients_gateway: StsGateway) -> None:
    secret = "s3cret-value-of-the-client"
    posted = clients_gateway.post(
        {"grant_type": "client_credentials", "client_id": "billing-svc", "client_secret": secret}
    )
    assert secret not in posted.raw.decode() and "not supported" in refused(posted, "invalid_client", 401)
    basic = base64.b64encode(f"billing-svc:{secret}".encode()).decode()
    with_basic = clients_gateway.post({"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"})
    refused(with_basic, "invalid_client", 401)
    assert with_basic.headers["www-authenticate"].startswith("Basic") and secret not in with_basic.raw.decode()
    anonymous = clients_gateway.post({"grant_type": "client_credentials"})
    assert "needs client authentication" in refused(anonymous, "invalid_client", 401)
    named_only = clients_gateway.post({"grant_type": "client_credentials", "client_id": "billing-svc"})
    assert "client assertion" in refused(named_only, "invalid_client", 401)
    half = clients_gateway.post({"grant_type": "client_credentials", "client_assertion_type": ASSERTION})
    refused(half, "invalid_request")
    odd_type = credentials(clients_gateway, "x.y.z", client_assertion_type="urn:example:saml")
    refused(odd_type, "invalid_client", 401)
    mismatch = credentials(
        clients_gateway, client_assertion(CLIENT_KEY, "billing-svc", clients_gateway.url), client_id="reporter"
    )
    refused(mismatch, "invalid_client", 401)
    unknown = credentials(
        clients_gateway, client_assertion(CLIENT_KEY, "billing-svc", clients_gateway.url), grant_type="password"
    )
    refused(unknown, "unsupported_grant_type")


# -- JWT-SVIDs as client assertions --------------------------------------------------------------


def svid_credentials(gateway: StsGateway, assertion: str) -> Reply:
    return credentials(gateway, assertion, client_assertion_type=SPIFFE_ASSERTION)


def test_a_jwt_svid_authenticates_a_workload(clients_gateway: StsGateway) -> None:
    url = clients_gateway.url
    registered = svid_credentials(clients_gateway, svid(BUNDLE_KEY, "spiffe://example.org/agents/planner", url))
    assert registered.status == 200, registered.body
    assert registered.body["scope"] == "chat"
    claims = claims_of(clients_gateway, registered.body["access_token"])
    assert claims["sub"] == "spiffe://example.org/agents/planner" and claims["kind"] == "agent"
    assert claims["sub_id"]["iss"] == "spiffe://example.org"
    plain = svid_credentials(
        clients_gateway, svid(BUNDLE_KEY, "spiffe://example.org/jobs/report", f"{url}/oauth2/token")
    )
    assert plain.status == 200, plain.body
    assert "scope" not in plain.body
    assert claims_of(clients_gateway, plain.body["access_token"])["kind"] == "service"  # the trust domain's default


def test_bad_jwt_svid_client_assertions_are_refused(clients_gateway: StsGateway) -> None:
    url = clients_gateway.url
    planner = "spiffe://example.org/agents/planner"
    cases = [
        (svid(BUNDLE_KEY, planner, "idgate-test"), "not accepted here"),  # an API audience, not the token service
        (svid(ec_key(), planner, url), "is not known"),
        (svid(BUNDLE_KEY, "spiffe://evil.org/agents/planner", url), "not trusted"),
        (svid(BUNDLE_KEY, planner, url, ttl=-300), "expired"),
    ]
    for assertion, words in cases:
        description = refused(svid_credentials(clients_gateway, assertion), "invalid_client", 401)
        assert words in description, description
    once = svid(BUNDLE_KEY, planner, url, jti="svid-1")
    assert svid_credentials(clients_gateway, once).status == 200
    assert "used before" in refused(svid_credentials(clients_gateway, once), "invalid_client", 401)


def kill(gateway: StsGateway, issuer: TestIssuer, **target: str) -> None:
    admin = issuer.mint({"sub": ADMIN, "kind": "human", "tenant": "ops"})
    body = orjson.dumps({**target, "reason": "compromised"})
    headers = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
    reply = raw_request(gateway.url, "POST", "/admin/revoke", body=body, headers=headers)
    assert reply.status == 200, reply.body


def test_a_kill_switched_client_gets_no_token_with_an_earlier_assertion(
    clients_gateway: StsGateway, issuer: TestIssuer
) -> None:
    url = clients_gateway.url
    planner = "spiffe://example.org/agents/planner"
    key_held = client_assertion(CLIENT_KEY, "billing-svc", url)  # made before the kill switch
    workload = svid(BUNDLE_KEY, planner, url)
    gateway_token = credentials(clients_gateway, client_assertion(CLIENT_KEY, "billing-svc", url)).body["access_token"]
    human = issuer.mint({"sub": "alice", "kind": "human", "scope": "chat"})
    kill(clients_gateway, issuer, subject="billing-svc")
    kill(clients_gateway, issuer, agent=planner)
    kill(clients_gateway, issuer, subject="alice")
    assert "no longer valid" in refused(credentials(clients_gateway, key_held), "invalid_client", 401)
    assert "no longer valid" in refused(svid_credentials(clients_gateway, workload), "invalid_client", 401)
    # The JWT bearer grant refuses a revoked assertion too: a gateway token, or a kill-switched subject's.
    for assertion in (gateway_token, human):
        refused(clients_gateway.post({"grant_type": JWT_BEARER, "assertion": assertion}), "invalid_grant")
    # Other clients are untouched.
    other = credentials(clients_gateway, client_assertion(FILE_CLIENT_KEY, "reporter", url))
    assert other.status == 200, other.body


# -- the JWT bearer grant -----------------------------------------------------------------------


def test_the_jwt_bearer_grant_gives_the_assertions_subject_a_gateway_token(
    clients_gateway: StsGateway, issuer: TestIssuer
) -> None:
    human = issuer.mint({"sub": "alice", "kind": "human", "scope": "chat models:read"})
    reply = clients_gateway.post({"grant_type": JWT_BEARER, "assertion": human, "scope": "chat"})
    assert reply.status == 200, reply.body
    claims = claims_of(clients_gateway, reply.body["access_token"])
    assert claims["sub"] == "alice" and claims["scope"] == "chat" and claims["sub_id"]["iss"] == issuer.issuer
    workload = svid(BUNDLE_KEY, "spiffe://example.org/jobs/report", "idgate-test")
    own = clients_gateway.post({"grant_type": JWT_BEARER, "assertion": workload})
    assert own.status == 200 and claims_of(clients_gateway, own.body["access_token"])["sub"].endswith("/jobs/report")
    bad = clients_gateway.post({"grant_type": JWT_BEARER, "assertion": human[:-4] + "AAAA"})
    assert human[:24] not in refused(bad, "invalid_grant")
    refused(clients_gateway.post({"grant_type": JWT_BEARER}), "invalid_request")
    # A client may not use someone else's assertion as if it were its own: that is delegation (token exchange).
    as_client = clients_gateway.post(
        {
            "grant_type": JWT_BEARER,
            "assertion": issuer.mint({"sub": "alice"}),
            "client_assertion_type": ASSERTION,
            "client_assertion": client_assertion(CLIENT_KEY, "billing-svc", clients_gateway.url),
        }
    )
    refused(as_client, "unauthorized_client")


def test_client_credentials_with_a_dpop_proof_is_bound(clients_gateway: StsGateway) -> None:
    key = DPoPKey()
    proof = key.proof("POST", f"{clients_gateway.url}/oauth2/token")
    reply = credentials(
        clients_gateway, client_assertion(CLIENT_KEY, "billing-svc", clients_gateway.url), {"DPoP": proof}
    )
    assert reply.status == 200 and reply.body["token_type"] == "DPoP", reply.body
    assert claims_of(clients_gateway, reply.body["access_token"])["cnf"] == {"jkt": key.jkt}


def test_metadata_names_grants_client_auth_and_dpop(clients_gateway: StsGateway) -> None:
    metadata = clients_gateway.get("/.well-known/oauth-authorization-server").body
    assert set(metadata["grant_types_supported"]) == {
        "urn:ietf:params:oauth:grant-type:token-exchange",
        JWT_BEARER,
        "client_credentials",
    }
    assert metadata["token_endpoint_auth_methods_supported"] == ["private_key_jwt", "none"]
    assert "ES256" in metadata["token_endpoint_auth_signing_alg_values_supported"]
    assert not any(
        a.startswith("HS") or a == "none" for a in metadata["token_endpoint_auth_signing_alg_values_supported"]
    )
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]
    resource = clients_gateway.get("/.well-known/oauth-protected-resource").body
    assert "ES256" in resource["dpop_signing_alg_values_supported"]


def test_every_oauth_error_has_an_rfc_code_and_echoes_no_secret(
    clients_gateway: StsGateway, issuer: TestIssuer
) -> None:
    secret_token = issuer.mint({"sub": "alice"})
    scoped_token = issuer.mint({"sub": "alice", "scope": "chat"})
    url = clients_gateway.url
    attempts: list[dict[str, str | list[str]]] = [
        {"grant_type": "client_credentials", "client_secret": secret_token},
        {"grant_type": "client_credentials", "client_assertion_type": ASSERTION, "client_assertion": secret_token},
        {
            "grant_type": "client_credentials",
            "client_assertion_type": SPIFFE_ASSERTION,
            "client_assertion": secret_token,
        },
        {"grant_type": JWT_BEARER, "assertion": secret_token[:-3] + "xyz"},
        {"grant_type": JWT_BEARER, "assertion": scoped_token, "scope": "admin"},
        {"grant_type": "urn:x", "assertion": secret_token},
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": secret_token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "audience": secret_token,
        },
        {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION,
            "client_assertion": client_assertion(CLIENT_KEY, "billing-svc", url, aud=secret_token),
        },
    ]
    for form in attempts:
        reply = clients_gateway.post(form)
        assert reply.status in (400, 401), reply.body
        assert reply.body["error"] in OAUTH_ERRORS, reply.body
        assert set(reply.body) == {"error", "error_description"}
        assert secret_token[:24] not in reply.raw.decode(), form
        assert secret_token.split(".")[2][:16] not in reply.raw.decode(), form


# -- the official MCP SDK as an OAuth client ------------------------------------------------------


class MemoryStorage(TokenStorage):
    """Token storage of one MCP SDK OAuth client, in memory (also used by tests/mcp)."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


async def test_the_mcp_sdk_private_key_jwt_provider_gets_a_token(clients_gateway: StsGateway) -> None:
    pem = CLIENT_KEY.as_pem(private=True).decode()
    assert serialization.load_pem_private_key(pem.encode(), None)  # a real PEM, as a deployment would hold
    storage = MemoryStorage()
    provider = PrivateKeyJWTOAuthProvider(
        server_url=f"{clients_gateway.url}/v1/models",
        storage=storage,
        client_id="billing-svc",
        assertion_provider=SignedJWTParameters(
            issuer="billing-svc", subject="billing-svc", signing_key=pem, signing_algorithm="ES256", lifetime_seconds=60
        ).create_assertion_provider(),
        issuer=clients_gateway.url,
    )
    async with httpx2.AsyncClient(auth=provider, timeout=10) as client:
        response = await client.get(f"{clients_gateway.url}/v1/models")
    assert response.status_code == 200, response.text
    assert storage.tokens is not None and storage.tokens.scope == "chat models:read"
    assert [m["id"] for m in response.json()["data"]]


async def test_the_mcp_sdk_with_a_jwt_svid_as_workload_identity_gets_a_token(clients_gateway: StsGateway) -> None:
    planner = "spiffe://example.org/agents/planner"
    storage = MemoryStorage()
    provider = PrivateKeyJWTOAuthProvider(
        server_url=f"{clients_gateway.url}/v1/models",
        storage=storage,
        client_id=planner,
        assertion_provider=static_assertion_provider(svid(BUNDLE_KEY, planner, clients_gateway.url)),
        issuer=clients_gateway.url,
    )
    async with httpx2.AsyncClient(auth=provider, timeout=10) as client:
        response = await client.get(f"{clients_gateway.url}/v1/models")
    assert response.status_code == 200, response.text
    assert storage.tokens is not None and storage.tokens.scope == "chat"  # the registered SPIFFE client's scope
    assert claims_of(clients_gateway, storage.tokens.access_token)["sub"] == planner


def test_client_config_is_checked(tmp_path: Path) -> None:
    def problems(client: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as caught:
            parse_config(
                {"dev_issuer": {"enabled": True}, "sts": {"clients": [client]}}, {"IDGATE_HOME": str(tmp_path)}
            )
        return str(caught.value)

    assert "private key members" in problems({"client_id": "c", "jwks": {"keys": [CLIENT_KEY.as_dict(private=True)]}})
    assert "exactly one of" in problems({"client_id": "c"})
    assert "give no `jwks" in problems({"client_id": "spiffe://example.org/x", "jwks_uri": "https://x/jwks"})
    assert "algorithms[0]: expected one of" in problems(
        {"client_id": "c", "jwks_uri": "https://x/j", "algorithms": ["HS256"]}
    )
