"""DPoP (RFC 9449): the proof checks one by one, the replay cache, nonces, and DPoP at the token endpoint."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, KeySetSerialization

from idgate.errors import ServiceUnavailable
from idgate.identity.dpop import DPoPVerifier, Nonces, ProofError, access_token_hash, jwk_thumbprint, normalize_url
from idgate.identity.replay import MemoryReplayCache, RedisReplayCache, ReplayCache, SqliteReplayCache
from idgate.sts.client_settings import DPoPSettings
from idgate.sts.settings import ReplayCacheSettings
from tests.conftest import MakeGateway, base_config
from tests.dpop_client import DPoPKey
from tests.sts.conftest import ACCESS_TOKEN, TOKEN_EXCHANGE, Reply, StsGateway
from tests.support import TestIssuer, Upstream, free_port

URL = "https://gw.example/v1/chat/completions"
TOKEN = "eyJ.the-access-token.sig"


@pytest.fixture
def verifier() -> DPoPVerifier:
    return DPoPVerifier(DPoPSettings(), public_url="https://gw.example", replay=MemoryReplayCache())


@pytest.fixture(scope="module")
def key() -> DPoPKey:
    return DPoPKey()


async def refused(verifier: DPoPVerifier, proof: str, match: str, **kwargs: Any) -> ProofError:
    args: dict[str, Any] = {"method": "POST", "url": URL, "access_token": TOKEN, **kwargs}
    with pytest.raises(ProofError, match=match) as caught:
        await verifier.verify(proof, **args)
    return caught.value


# -- one proof, each check --------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "RS256", "Ed25519"])
async def test_a_correct_proof_is_accepted_and_names_its_key(verifier: DPoPVerifier, alg: str) -> None:
    client = DPoPKey(alg)
    proof = await verifier.verify(client.proof("POST", URL, token=TOKEN), method="POST", url=URL, access_token=TOKEN)
    assert proof.jkt == client.jkt == jwk_thumbprint(client.jwk)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"method": "GET"}, "`htm` must be `GET`"),
        ({"url": "https://gw.example/v1/embeddings"}, "`htu` must be `https://gw.example/v1/embeddings`"),
        ({"url": "https://other.example/v1/chat/completions"}, "`htu`"),
        ({"url": "http://gw.example/v1/chat/completions"}, "`htu`"),
        ({"access_token": "another.access.token"}, "`ath` does not match"),
        ({"jkt": "some-other-thumbprint"}, "signed by another key"),
    ],
)
async def test_a_proof_for_another_request_is_refused(
    verifier: DPoPVerifier, key: DPoPKey, change: dict[str, Any], match: str
) -> None:
    await refused(verifier, key.proof("POST", URL, token=TOKEN), match, **change)


async def test_htu_is_compared_without_query_or_fragment_and_normalized(verifier: DPoPVerifier, key: DPoPKey) -> None:
    for htu in ("https://GW.example:443/v1/chat/completions?x=1", "https://gw.example/v1/chat/%63ompletions#f"):
        await verifier.verify(key.proof("POST", htu, token=TOKEN), method="POST", url=URL, access_token=TOKEN)
    assert normalize_url("HTTP://Example.COM:80") == "http://example.com/"
    assert normalize_url("https://example.com:8443/a%2fb") == "https://example.com:8443/a%2Fb"
    assert normalize_url("ftp://example.com/") is None


@pytest.mark.parametrize(
    ("proof_kwargs", "match"),
    [
        ({"iat": -120}, "`iat` is not within 60 seconds"),  # seconds from now
        ({"iat": 120}, "`iat` is not within 60 seconds"),
        ({"drop": ("ath",)}, "no `ath`"),
        ({"drop": ("jti",)}, "no valid `jti`"),
        ({"drop": ("htm",)}, "`htm` must be `POST`"),
        ({"drop": ("iat",)}, "no `iat`"),
        ({"header": {"typ": "JWT"}}, "`typ` must be `dpop\\+jwt`"),
        ({"header": {"kid": "k1", "crit": ["kid"]}}, "critical header"),
    ],
)
async def test_a_malformed_or_stale_proof_is_refused(
    verifier: DPoPVerifier, key: DPoPKey, proof_kwargs: dict[str, Any], match: str
) -> None:
    if "iat" in proof_kwargs:
        proof_kwargs = {**proof_kwargs, "iat": time.time() + proof_kwargs["iat"]}
    await refused(verifier, key.proof("POST", URL, token=TOKEN, **proof_kwargs), match)


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()


async def test_symmetric_unsigned_and_private_keys_are_refused(verifier: DPoPVerifier, key: DPoPKey) -> None:
    header, payload, signature = key.proof("POST", URL, token=TOKEN).split(".")
    head = orjson.loads(base64.urlsafe_b64decode(header + "=="))
    for alg in ("none", "HS256"):
        await refused(verifier, f"{_b64({**head, 'alg': alg})}.{payload}.{signature}", f"`alg` `{alg}` is not accepted")
    private = {**head, "jwk": key.key.as_dict(private=True)}
    await refused(verifier, f"{_b64(private)}.{payload}.{signature}", "contains a private key")
    no_key = {k: v for k, v in head.items() if k != "jwk"}
    await refused(verifier, f"{_b64(no_key)}.{payload}.{signature}", "has no `jwk`")
    other = DPoPKey()
    swapped = {**head, "jwk": other.jwk}  # the header claims another key: the signature does not fit it
    await refused(verifier, f"{_b64(swapped)}.{payload}.{signature}", "signature is invalid")
    rsa_for_es = {**head, "jwk": DPoPKey("RS256").jwk}
    await refused(verifier, f"{_b64(rsa_for_es)}.{payload}.{signature}", "needs an EC key")
    tampered = _b64({**orjson.loads(base64.urlsafe_b64decode(payload + "==")), "htm": "POST", "x": 1})
    await refused(verifier, f"{header}.{tampered}.{signature}", "signature is invalid")
    await refused(verifier, "not-a-jwt", "not a JWT")


async def test_a_replayed_jti_is_refused_and_a_refused_proof_does_not_use_it_up(
    verifier: DPoPVerifier, key: DPoPKey
) -> None:
    proof = key.proof("POST", URL, token=TOKEN, jti="once")
    await refused(verifier, proof, "`htm` must be `GET`", method="GET")  # refused for something else: `jti` still fresh
    await verifier.verify(proof, method="POST", url=URL, access_token=TOKEN)
    await refused(verifier, proof, "used before")
    await refused(verifier, key.proof("POST", URL, token=TOKEN, jti="once"), "used before")  # a new proof, the same jti
    DPoPKey().proof("POST", URL, token=TOKEN, jti="once")  # another key's `once` is another value


def test_ath_is_the_base64url_sha256_of_the_token() -> None:
    # RFC 9449 §7.1 example: the access token and its `ath`.
    assert (
        access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU")
        == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    )


# -- the replay cache across workers -------------------------------------------------------


REDIS_URL = "redis://127.0.0.1:6379/0"


def _caches(backend: str, tmp_path: Path) -> tuple[ReplayCache, ReplayCache]:
    """Two caches as two workers (or replicas) have them: separate processes' views of one store."""
    if backend == "sqlite":
        return SqliteReplayCache(tmp_path / "replay.db"), SqliteReplayCache(tmp_path / "replay.db")
    prefix = f"idgate-test:{secrets.token_hex(6)}:"
    return RedisReplayCache(REDIS_URL, prefix=prefix), RedisReplayCache(REDIS_URL, prefix=prefix)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_the_replay_cache_is_shared_by_workers(backend: str, tmp_path: Path) -> None:
    one, two = _caches(backend, tmp_path)
    try:
        later = time.time() + 60
        assert await one.first_use("dpop", "k:1", later) is True
        assert await two.first_use("dpop", "k:1", later) is False  # the other worker saw it first
        assert await one.first_use("dpop", "k:1", later) is False  # and the first worker remembers
        assert await two.first_use("client", "k:1", later) is True  # another namespace is another value
        assert await one.first_use("dpop", "k:2", time.time() - 1) is True
        await asyncio.sleep(0.01)
        assert await two.first_use("dpop", "k:2", later) is True  # an expired entry does not block its value
        racing = await asyncio.gather(*(cache.first_use("dpop", "k:3", later) for cache in (one, two) * 4))
        assert sorted(racing) == [False] * 7 + [True]  # exactly one winner
    finally:
        await one.close()
        await two.close()


async def test_an_unusable_replay_cache_refuses(tmp_path: Path) -> None:
    (tmp_path / "replay.db").mkdir()  # a folder where the database should be
    with pytest.raises(ServiceUnavailable):
        await SqliteReplayCache(tmp_path / "replay.db").first_use("dpop", "x", time.time() + 60)
    damaged = tmp_path / "damaged" / "replay.db"
    damaged.parent.mkdir()
    damaged.write_bytes(b"not a database, for example after a crash of the machine" * 100)
    cache = SqliteReplayCache(damaged)
    with pytest.raises(ServiceUnavailable):
        await cache.first_use("dpop", "x", time.time() + 60)
    assert await cache.first_use("dpop", "x", time.time() + 60) is True  # moved aside, started afresh
    assert [p.name for p in damaged.parent.iterdir() if "damaged-" in p.name]
    await cache.close()
    unreachable = RedisReplayCache(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    with pytest.raises(ServiceUnavailable):
        await unreachable.first_use("dpop", "x", time.time() + 60)
    await unreachable.close()


def test_replay_cache_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="needs `redis_url`"):
        ReplayCacheSettings(backend="redis")
    with pytest.raises(ValueError, match="must not contain a password"):
        ReplayCacheSettings(backend="redis", redis_url="redis://:hunter2@127.0.0.1:6379/0")


# -- nonces ----------------------------------------------------------------------------------


async def test_nonces_are_required_when_configured_and_shared_by_workers(tmp_path: Path, key: DPoPKey) -> None:
    settings = DPoPSettings(require_nonce=True, nonce_lifetime_seconds=60)
    nonces = Nonces.from_state(tmp_path, 60)
    verifier = DPoPVerifier(settings, public_url="https://gw.example", replay=MemoryReplayCache(), nonces=nonces)
    error = await refused(verifier, key.proof("POST", URL, token=TOKEN), "server nonce is required")
    assert error.error == "use_dpop_nonce"
    other_worker = Nonces.from_state(tmp_path, 60)  # the same key file
    await verifier.verify(
        key.proof("POST", URL, token=TOKEN, nonce=other_worker.issue()), method="POST", url=URL, access_token=TOKEN
    )
    for bad in ("made-up-nonce", nonces.issue()[:-2] + "AA"):
        assert (
            await refused(verifier, key.proof("POST", URL, token=TOKEN, nonce=bad), "not valid")
        ).error == "use_dpop_nonce"
    old = Nonces.from_state(tmp_path, 60, clock=lambda: time.time() - 120).issue()
    await refused(verifier, key.proof("POST", URL, token=TOKEN, nonce=old), "not valid or too old")
    assert (tmp_path / "dpop-nonce.key").stat().st_mode & 0o077 == 0


# -- at the token endpoint -----------------------------------------------------------------


def _claims(sts_gateway: StsGateway, token: str) -> dict[str, Any]:
    keys = KeySet.import_key_set(cast(KeySetSerialization, sts_gateway.sts.keys.jwks()))
    claims: dict[str, Any] = jwt.decode(token, keys).claims
    return claims


def human(issuer: TestIssuer, **claims: Any) -> str:
    return issuer.mint({"sub": "alice", "kind": "human", "scope": "chat models:read", **claims})


def exchange(sts_gateway: StsGateway, subject: str, proof: str | None = None, **params: str) -> Reply:
    form: dict[str, str | list[str]] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN,
        **params,
    }
    return sts_gateway.post(form, headers={"DPoP": proof} if proof is not None else None)


def test_a_token_request_with_a_proof_gets_a_dpop_bound_token(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    client = DPoPKey()
    token_url = f"{sts_gateway.url}/oauth2/token"
    reply = exchange(sts_gateway, human(issuer), client.proof("POST", token_url))
    assert reply.status == 200, reply.body
    assert reply.body["token_type"] == "DPoP"
    assert _claims(sts_gateway, reply.body["access_token"])["cnf"] == {"jkt": client.jkt}
    plain = exchange(sts_gateway, human(issuer))
    assert plain.body["token_type"] == "Bearer"
    assert "cnf" not in _claims(sts_gateway, plain.body["access_token"])


@pytest.mark.parametrize(
    ("proof", "match"),
    [
        (lambda url, key: key.proof("GET", url), "`htm` must be `POST`"),
        (lambda url, key: key.proof("POST", url.replace("/oauth2/token", "/oauth2/other")), "`htu`"),
        (lambda url, key: key.proof("POST", url, iat=time.time() - 300), "`iat`"),
        (lambda url, key: "garbage", "not a JWT"),
    ],
)
def test_a_bad_proof_at_the_token_endpoint_is_invalid_dpop_proof(
    sts_gateway: StsGateway, issuer: TestIssuer, proof: Any, match: str
) -> None:
    subject = human(issuer)
    reply = exchange(sts_gateway, subject, proof(f"{sts_gateway.url}/oauth2/token", DPoPKey()))
    assert reply.status == 400 and reply.body["error"] == "invalid_dpop_proof", reply.body
    assert match in reply.body["error_description"], reply.body
    assert subject[:24] not in reply.raw.decode()


def test_a_replayed_proof_at_the_token_endpoint_is_refused(sts_gateway: StsGateway, issuer: TestIssuer) -> None:
    proof = DPoPKey().proof("POST", f"{sts_gateway.url}/oauth2/token")
    assert exchange(sts_gateway, human(issuer), proof).status == 200
    again = exchange(sts_gateway, human(issuer), proof)
    assert again.status == 400 and again.body["error"] == "invalid_dpop_proof"
    assert "used before" in again.body["error_description"]


def test_exchanging_a_dpop_bound_token_needs_a_proof_of_the_same_key(
    sts_gateway: StsGateway, issuer: TestIssuer
) -> None:
    client = DPoPKey()
    token_url = f"{sts_gateway.url}/oauth2/token"
    bound = exchange(sts_gateway, human(issuer), client.proof("POST", token_url)).body["access_token"]
    without = exchange(sts_gateway, bound)
    assert without.status == 400 and without.body["error"] == "invalid_grant"
    assert "DPoP-bound" in without.body["error_description"]
    other = exchange(sts_gateway, bound, DPoPKey().proof("POST", token_url))
    assert other.status == 400 and other.body["error"] == "invalid_grant"
    same = exchange(sts_gateway, bound, client.proof("POST", token_url), scope="chat")
    assert same.status == 200, same.body
    assert _claims(sts_gateway, same.body["access_token"])["cnf"] == {"jkt": client.jkt}


def test_the_token_endpoint_hands_out_nonces_when_they_are_required(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    config = base_config(issuer, upstream)
    config["sts"] = {"dpop": {"require_nonce": True}}
    gateway = make_gateway(config)
    token_url = f"{gateway.url}/oauth2/token"
    client = DPoPKey()
    sts = StsGateway(gateway, None)  # type: ignore[arg-type]
    first = exchange(sts, human(issuer), client.proof("POST", token_url))
    assert first.status == 400 and first.body["error"] == "use_dpop_nonce", first.body
    nonce = first.headers["dpop-nonce"]
    second = exchange(sts, human(issuer), client.proof("POST", token_url, nonce=nonce))
    assert second.status == 200 and second.body["token_type"] == "DPoP", second.body
    assert second.headers["dpop-nonce"]  # the next one to use
    metadata = sts.get("/.well-known/oauth-authorization-server").body
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]
    assert urllib.parse.urlsplit(metadata["token_endpoint"]).path == "/oauth2/token"
