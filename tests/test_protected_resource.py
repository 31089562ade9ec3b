"""RFC 9728: every 401 points to the protected-resource metadata, which says where tokens come from."""

from __future__ import annotations

import re

import orjson

from tests.support import Gateway, TestIssuer, raw_request


def challenge_params(header: str) -> dict[str, str]:
    assert header.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def test_a_401_points_to_the_metadata_and_the_metadata_to_the_token_services(
    gateway: Gateway, issuer: TestIssuer
) -> None:
    missing = raw_request(gateway.url, "GET", "/v1/models")
    bad = raw_request(gateway.url, "GET", "/v1/models", headers={"Authorization": "Bearer x.y.z"})
    for response in (missing, bad):
        assert response.status == 401
        params = challenge_params(response.headers["www-authenticate"])
        assert params["realm"] == "idgate"
        assert params["resource_metadata"] == f"{gateway.config.server.url}/.well-known/oauth-protected-resource"
    assert "error" not in challenge_params(missing.headers["www-authenticate"])
    assert challenge_params(bad.headers["www-authenticate"])["error"] == "invalid_token"

    path = challenge_params(missing.headers["www-authenticate"])["resource_metadata"].removeprefix(
        gateway.config.server.url
    )
    metadata = orjson.loads(raw_request(gateway.url, "GET", path).body)
    assert metadata["resource"] == gateway.config.server.url
    assert metadata["authorization_servers"] == [gateway.config.server.url, issuer.issuer]
    assert metadata["bearer_methods_supported"] == ["header"]
    token_service = orjson.loads(raw_request(gateway.url, "GET", "/.well-known/oauth-authorization-server").body)
    assert token_service["issuer"] == metadata["authorization_servers"][0]
