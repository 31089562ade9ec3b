"""The HTTP surface byte by byte: bad requests, size limits, routing, health, and failing closed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import UPSTREAM_KEY, MakeGateway, base_config
from tests.support import Gateway, RawResponse, TestIssuer, Upstream, break_audit_trail, raw_request

LIMIT = 1024
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gateway(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream) -> Gateway:
    config = base_config(issuer, upstream)
    config["server"] = {"max_body_bytes": LIMIT}
    return make_gateway(config)


@pytest.fixture
def token(issuer: TestIssuer) -> str:
    return issuer.mint()


def call(
    gateway: Gateway,
    token: str | None,
    body: bytes | Iterator[bytes] | None,
    path: str = "/v1/chat/completions",
    method: str = "POST",
    **headers: str,
) -> RawResponse:
    sent = {"Content-Type": "application/json", **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return raw_request(gateway.url, method, path, body, sent)


def assert_error(response: RawResponse, status: int, code: str) -> dict[str, Any]:
    """An error in OpenAI's shape, with the request id in the body and the header."""
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    payload = response.json()
    assert set(payload) == {"error"}
    error: dict[str, Any] = payload["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def record_of(gateway: Gateway, response: RawResponse) -> dict[str, Any]:
    return gateway.record(response.headers["x-request-id"])


# -- what a request body must be -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b'{"model": "gpt-test", "messages": [', "invalid_json", "not valid JSON"),
        (b"", "invalid_json", "not valid JSON"),
        (b"\xff\xfe", "invalid_json", "not valid JSON"),
        (b"[]", "invalid_json", "must be a JSON object"),
        (b'"gpt-test"', "invalid_json", "must be a JSON object"),
        (b"42", "invalid_json", "must be a JSON object"),
        (b"null", "invalid_json", "must be a JSON object"),
        (b'{"messages": []}', "invalid_request", "`model` must be a non-empty string"),
        (b'{"model": 7, "messages": []}', "invalid_request", "`model` must be a non-empty string"),
        (b'{"model": "", "messages": []}', "invalid_request", "`model` must be a non-empty string"),
        (b'{"model": null, "messages": []}', "invalid_request", "`model` must be a non-empty string"),
        (b'{"model": "gpt-test", "stream": "yes"}', "invalid_request", "`stream` must be true or false"),
        (b'{"model": "gpt-test", "stream": 1}', "invalid_request", "`stream` must be true or false"),
        (b'{"model": "gpt-test", "stream": null}', "invalid_request", "`stream` must be true or false"),
    ],
)
def test_bad_bodies_are_400_and_go_nowhere(
    gateway: Gateway, upstream: Upstream, token: str, body: bytes, code: str, says: str
) -> None:
    response = call(gateway, token, body)
    error = assert_error(response, 400, code)
    assert error["type"] == "invalid_request_error"
    assert says in error["message"]
    assert upstream.received == []
    record = record_of(gateway, response)
    assert record["status"] == 400 and record["outcome"] == "refused" and record["error"]["code"] == code
    assert record["subject"]["id"] == "alice"  # who sent it is known: identity comes first


def test_bad_embeddings_body_is_400(gateway: Gateway, upstream: Upstream, token: str) -> None:
    assert_error(call(gateway, token, b"{not json", "/v1/embeddings"), 400, "invalid_json")
    error = assert_error(
        call(gateway, token, b'{"model": "embed-test", "input": "x", "stream": true}', "/v1/embeddings"),
        400,
        "invalid_request",
    )
    assert "`stream`" in error["message"]
    assert upstream.received == []


def test_identity_is_checked_before_the_body_is_read(gateway: Gateway, upstream: Upstream) -> None:
    response = call(gateway, None, b"{broken")
    assert_error(response, 401, "missing_token")
    assert response.headers["www-authenticate"].startswith("Bearer")


# -- the size limit ------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes."""
    body = orjson.dumps(CHAT)
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_body_at_the_limit_is_served(gateway: Gateway, upstream: Upstream, token: str) -> None:
    body = padded(LIMIT)
    assert len(body) == LIMIT
    assert call(gateway, token, body).status == 200
    assert len(upstream.received) == 1


def test_body_over_the_limit_with_content_length_is_413(gateway: Gateway, upstream: Upstream, token: str) -> None:
    response = call(gateway, token, padded(LIMIT + 1))
    error = assert_error(response, 413, "request_too_large")
    assert str(LIMIT) in error["message"]
    assert upstream.received == []
    record = record_of(gateway, response)
    assert record["status"] == 413 and record["outcome"] == "refused"


def test_chunked_body_over_the_limit_is_413(gateway: Gateway, upstream: Upstream, token: str) -> None:
    body = padded(4 * LIMIT)
    chunks = iter([body[i : i + 256] for i in range(0, len(body), 256)])  # no Content-Length: chunked
    response = call(gateway, token, chunks)
    assert_error(response, 413, "request_too_large")
    assert upstream.received == []
    assert record_of(gateway, response)["status"] == 413


def test_chunked_body_under_the_limit_is_served(gateway: Gateway, upstream: Upstream, token: str) -> None:
    body = padded(LIMIT)
    response = call(gateway, token, iter([body[:300], body[300:700], body[700:]]))
    assert response.status == 200
    assert upstream.received[-1]["body"]["messages"] == CHAT["messages"]


def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    gateway: Gateway, upstream: Upstream, token: str
) -> None:
    # The client announces 1 MB and waits for an answer before sending it (`Expect: 100-continue`).
    response = call(gateway, token, None, **{"Content-Length": str(1 << 20), "Expect": "100-continue"})
    assert_error(response, 413, "request_too_large")
    assert upstream.received == []


# -- routing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/completions", "/v1/chat/completions/", "/v2/chat/completions"])
def test_unknown_path_is_404_json(gateway: Gateway, path: str) -> None:
    response = raw_request(gateway.url, "POST", path, b"{}")
    error = assert_error(response, 404, "not_found")
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/chat/completions"),
        ("GET", "/v1/embeddings"),
        ("POST", "/v1/models"),
        ("DELETE", "/healthz"),
        ("POST", "/readyz"),
    ],
)
def test_wrong_method_is_405_json(gateway: Gateway, upstream: Upstream, method: str, path: str) -> None:
    response = raw_request(gateway.url, method, path)
    error = assert_error(response, 405, "method_not_allowed")
    assert path in error["message"]
    assert method not in response.headers["allow"] and response.headers["allow"] in ("GET", "POST")
    assert upstream.received == []


def test_health_and_readiness(gateway: Gateway) -> None:
    health = raw_request(gateway.url, "GET", "/healthz")
    assert health.status == 200 and health.json() == {"status": "ok"}
    assert health.headers["x-request-id"].startswith("req_")
    ready = raw_request(gateway.url, "GET", "/readyz")
    assert ready.status == 200 and ready.json() == {"status": "ready", "checks": {"audit": True, "liveness": True}}


# -- failing closed when the audit trail cannot record ----------------------------------------------


def test_a_failed_audit_store_fails_closed(gateway: Gateway, upstream: Upstream, token: str) -> None:
    assert call(gateway, token, orjson.dumps(CHAT)).status == 200
    assert len(upstream.received) == 1
    break_audit_trail(gateway)

    ready = raw_request(gateway.url, "GET", "/readyz")
    assert ready.json() == {"status": "not ready", "checks": {"audit": False, "liveness": True}}
    assert raw_request(gateway.url, "GET", "/healthz").status == 200  # alive, just not ready

    for body in (CHAT, {**CHAT, "stream": True}):
        error = assert_error(call(gateway, token, orjson.dumps(body)), 503, "unavailable")
        assert "nothing was forwarded" in error["message"]
    assert_error(call(gateway, token, b'{"model": "embed-test", "input": "x"}', "/v1/embeddings"), 503, "unavailable")
    assert_error(call(gateway, token, None, "/v1/models", "GET"), 503, "unavailable")
    assert len(upstream.received) == 1  # nothing more reached the upstream


def test_a_stopped_audit_writer_fails_closed(gateway: Gateway, upstream: Upstream, token: str) -> None:
    gateway.app.audit.close()  # e.g. its thread died
    assert raw_request(gateway.url, "GET", "/readyz").status == 503
    assert_error(call(gateway, token, orjson.dumps(CHAT)), 503, "unavailable")
    assert upstream.received == []


def test_an_audit_store_that_cannot_be_opened_stops_start_up(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    config = base_config(issuer, upstream)
    config["audit"] = {"path": str(blocker / "audit.db")}
    with pytest.raises(RuntimeError, match="did not start"):
        make_gateway(config)


# -- request ids and secrets in the trail ----------------------------------------------------------


def test_every_response_names_its_audit_record_and_no_record_holds_a_secret(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream, token: str
) -> None:
    beta = issuer.mint({"tenant": "acme"})
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")  # a bad signature
    not_a_jwt = "sk-proj-a-secret-someone-pasted-as-a-token"
    expired = issuer.mint(ttl=-3600)
    responses = [
        call(gateway, token, orjson.dumps(CHAT)),
        call(gateway, token, orjson.dumps({**CHAT, "stream": True})),
        call(gateway, token, b'{"model": "embed-test", "input": "hi"}', "/v1/embeddings"),
        call(gateway, token, None, "/v1/models", "GET"),
        call(gateway, token, orjson.dumps({**CHAT, "model": "nope"})),
        call(gateway, beta, orjson.dumps({**CHAT, "model": "beta-only"})),
        call(gateway, token, b"{"),
        call(gateway, token, padded(LIMIT + 1)),
        call(gateway, None, orjson.dumps(CHAT)),
        call(gateway, forged, orjson.dumps(CHAT)),
        call(gateway, not_a_jwt, orjson.dumps(CHAT)),
        call(gateway, expired, orjson.dumps(CHAT)),
    ]
    assert [r.status for r in responses] == [200, 200, 200, 200, 404, 403, 400, 413, 401, 401, 401, 401]
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids) and all(i.startswith("req_") for i in ids)

    gateway.record(ids[1])  # the stream's record comes just after its last byte
    records = gateway.records()
    assert [r["request_id"] for r in records] == ids
    assert [r["status"] for r in records] == [r.status for r in responses]
    assert records[5]["decision"]["id"] == responses[5].json()["error"]["decision_id"]

    trail = orjson.dumps(records).decode()
    for secret in (token, beta, forged, expired, not_a_jwt, UPSTREAM_KEY):
        assert secret not in trail
    for signature in (token.rsplit(".", 1)[1], forged.rsplit(".", 1)[1]):
        assert signature not in trail
    # ... nor in the store's files as written on disk (the commit journal's included).
    gateway.app.audit.flush()
    path = gateway.config.audit_path
    files = [p for p in path.parent.glob(path.name + "*") if p.is_file()]
    files += list(path.with_name(path.name + ".pending").iterdir())
    assert any(p.suffix == ".jsonl" for p in files)
    stored = b"".join(p.read_bytes() for p in files)
    for secret in (token, not_a_jwt, UPSTREAM_KEY):
        assert secret.encode() not in stored
    assert upstream.received and token not in str(upstream.received)
