"""Identity, in-process: bearer parsing, SPIFFE IDs, key sets, the authenticator, claim mapping, config.

Keys are real (joserfc), loaders are counting fakes, clocks are injected: no
network, no sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from joserfc import jws, jwt
from joserfc.jwk import ECKey, RSAKey

from idgate.config import ClaimsConfig, IssuerConfig, KindRule, SpiffeIssuerConfig, SpiffeRule, parse_config
from idgate.errors import ConfigError, InvalidToken, MissingCredential, ServiceUnavailable
from idgate.identity.authenticator import Authenticator, bearer_token
from idgate.identity.issuers import MAX_ACTOR_DEPTH, OidcIssuer, SpiffeIssuer, actor_chain
from idgate.identity.keys import KeySet, file_loader, http_loader
from idgate.identity.principal import Actor, Caller
from idgate.identity.spiffe import SpiffeId, parse_spiffe_id
from tests.support import AiohttpServer

ISS = "https://idp.example"
AUD = "idgate-test"
NOW = 1_700_000_000.0
Key = RSAKey | ECKey


# -- helpers -----------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Jwks:
    """A JWKS loader that counts its calls; `fail` makes it fail like an unreachable endpoint."""

    def __init__(self, *keys: Key, use: str | None = "sig") -> None:
        self.keys = list(keys)
        self.use = use
        self.extra: list[Any] = []
        self.calls = 0
        self.fail = False
        self.delay = 0.0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise OSError("connection refused")
        entries = []
        for key in self.keys:
            entry = dict(key.as_dict(private=False))
            entry.pop("use", None)
            if self.use is not None:
                entry["use"] = self.use
            entries.append(entry)
        return {"keys": entries + self.extra}


def rsa_key() -> RSAKey:
    key = RSAKey.generate_key(2048, parameters={"use": "sig"})
    key.ensure_kid()
    return key


def ec_key() -> ECKey:
    key = ECKey.generate_key("P-256", parameters={"use": "sig"})
    key.ensure_kid()
    return key


@pytest.fixture(scope="module")
def key() -> RSAKey:
    return rsa_key()


@pytest.fixture(scope="module")
def other_key() -> RSAKey:
    return rsa_key()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(claims: dict[str, Any] | None = None, now: float = NOW, ttl: int = 300) -> dict[str, Any]:
    body: dict[str, Any] = {"iss": ISS, "sub": "alice", "aud": AUD, "iat": int(now), "exp": int(now) + ttl}
    body.update(claims or {})
    return {k: v for k, v in body.items() if v is not None}


def sign(
    key: Key,
    claims: dict[str, Any] | None = None,
    *,
    header: dict[str, Any] | None = None,
    alg: str = "RS256",
    now: float = NOW,
    ttl: int = 300,
) -> str:
    head: dict[str, Any] = {"alg": alg, "kid": key.kid, "typ": "JWT", **(header or {})}
    return jwt.encode({k: v for k, v in head.items() if v is not None}, claims_of(claims, now, ttl), key)


RS256_HEADER = b64(b'{"alg":"RS256"}')


def hand_made(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None = None) -> str:
    """A compact JWS built by hand: unsigned, or HMAC-SHA256 with `secret`."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def issuer_config(**overrides: Any) -> IssuerConfig:
    values: dict[str, Any] = {"name": "corp", "issuer": ISS, "jwks_uri": "https://idp.example/jwks", **overrides}
    return IssuerConfig.model_validate(values)


def oidc(
    loader: Jwks,
    *,
    clock: Clock | None = None,
    refetch: float = 30.0,
    secret: str | None = None,
    **config: Any,
) -> OidcIssuer:
    keys = KeySet("corp", loader, refetch_interval=refetch, cache_ttl=300.0, clock=clock or Clock())
    return OidcIssuer(issuer_config(**config), keys, (AUD,), secret)


def bearer(token: str) -> bytes:
    return b"Bearer " + token.encode()


async def refused(auth: Authenticator, token: str, message: str) -> InvalidToken:
    with pytest.raises(InvalidToken, match=message) as caught:
        await auth.authenticate(bearer(token))
    assert token not in caught.value.message
    return caught.value


class CountingVerify:
    """Counts signature verifications done by the authenticator."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jws.deserialize_compact

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(jws, "deserialize_compact", counting)


# -- the Authorization header ----------------------------------------------------


@pytest.mark.parametrize("value", [None, b"", b"Bearer", b"Bearer   ", b"Basic dXNlcjpwYXNz", b"Token abc", b"abc"])
def test_no_bearer_token_is_a_missing_credential(value: bytes | None) -> None:
    with pytest.raises(MissingCredential, match="no bearer token"):
        bearer_token(value)


@pytest.mark.parametrize("value", [b"Bearer abc.def.ghi", b"bearer abc.def.ghi", b"BEARER   abc.def.ghi  "])
def test_bearer_scheme_is_case_insensitive(value: bytes) -> None:
    assert bearer_token(value) == "abc.def.ghi"


# -- SPIFFE IDs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "domain", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/agents/a1", "example.org", "/agents/a1"),
        ("spiffe://prod-1.example_org/ns/default/sa/web", "prod-1.example_org", "/ns/default/sa/web"),
        ("spiffe://example.org/Mixed.Case_ok-1", "example.org", "/Mixed.Case_ok-1"),
    ],
)
def test_spiffe_ids_parse(value: str, domain: str, path: str) -> None:
    parsed = parse_spiffe_id(value)
    assert parsed == SpiffeId(domain, path)
    assert str(parsed) == value


@pytest.mark.parametrize(
    "value",
    [
        "https://example.org/agents/a1",
        "SPIFFE://example.org/a",
        "spiffe://",
        "spiffe:///a",
        "spiffe://Example.org/a",
        "spiffe://example.org:443/a",
        "spiffe://user@example.org/a",
        "spiffe://example.org/a?x=1",
        "spiffe://example.org/a#frag",
        "spiffe://example.org/a%20b",
        "spiffe://example.org/",
        "spiffe://example.org/a//b",
        "spiffe://example.org/a/",
        "spiffe://example.org/./a",
        "spiffe://example.org/a/..",
        "spiffe://example.org/a b",
        "spiffe://exa mple.org/a",
    ],
)
def test_bad_spiffe_ids_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_spiffe_id(value)


# -- key sets ----------------------------------------------------------------------


async def test_keyset_takes_public_signing_keys_only(key: RSAKey) -> None:
    loader = Jwks(key)
    enc = rsa_key()
    unnamed = rsa_key()
    loader.extra = [
        {**enc.as_dict(private=False), "use": "enc"},
        {**rsa_key().as_dict(private=True), "kid": "private", "use": "sig"},
        {"kty": "oct", "k": b64(b"a shared secret that is long enough"), "kid": "oct", "use": "sig"},
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        "not an object",
        {k: v for k, v in unnamed.as_dict(private=False).items() if k not in ("kid", "use")},
    ]
    keys = KeySet("corp", loader)
    assert (await keys.key(key.kid)).as_dict() == key.as_dict(private=False)
    assert keys.has(unnamed.thumbprint())  # no `kid`: named by its RFC 7638 thumbprint
    for kid in (enc.kid, "private", "oct", "broken"):
        assert not keys.has(str(kid))
        with pytest.raises(InvalidToken, match="is not known"):
            await keys.key(kid)


async def test_spiffe_bundle_takes_only_jwt_svid_keys() -> None:
    jwt_svid, x509, unmarked = ec_key(), ec_key(), ec_key()
    loader = Jwks(jwt_svid, use="jwt-svid")
    loader.extra = [
        {**x509.as_dict(private=False), "use": "x509-svid"},
        {k: v for k, v in unmarked.as_dict(private=False).items() if k != "use"},
    ]
    keys = KeySet("mesh", loader, use="jwt-svid")
    await keys.key(jwt_svid.kid)
    assert not keys.has(str(x509.kid))
    # The SPIFFE bundle format requires `use`; a key that does not say it is for JWT-SVIDs is not one.
    assert not keys.has(str(unmarked.kid))


async def test_unknown_kid_refetches_once_per_interval(key: RSAKey) -> None:
    clock = Clock(100.0)
    loader = Jwks(key)
    keys = KeySet("corp", loader, refetch_interval=30, cache_ttl=300, clock=clock)
    await keys.key(key.kid)
    assert loader.calls == 1
    await keys.key(key.kid)
    assert loader.calls == 1  # known keys are cached
    with pytest.raises(InvalidToken, match="is not known"):
        await keys.key("nope")
    assert loader.calls == 1  # the first fetch was just now: no refetch yet
    clock.now += 31
    for _ in range(3):
        with pytest.raises(InvalidToken, match="signing key `nope` is not known for issuer `corp`"):
            await keys.key("nope")
    assert loader.calls == 2  # one refetch, then rate-limited
    rotated = rsa_key()
    loader.keys = [rotated]
    with pytest.raises(InvalidToken, match="is not known"):
        await keys.key(rotated.kid)
    clock.now += 31
    assert await keys.key(rotated.kid) is not None  # the next interval refetches and finds it
    assert loader.calls == 3
    assert not keys.has(str(key.kid))


async def test_keys_are_refetched_after_cache_ttl(key: RSAKey, other_key: RSAKey) -> None:
    clock = Clock(100.0)
    loader = Jwks(key)
    keys = KeySet("corp", loader, refetch_interval=30, cache_ttl=300, clock=clock)
    await keys.key(key.kid)
    loader.keys = [other_key]  # the issuer withdrew the key
    clock.now += 299
    await keys.key(key.kid)
    assert loader.calls == 1
    clock.now += 2
    with pytest.raises(InvalidToken, match="is not known"):
        await keys.key(key.kid)  # a known kid, but the set is stale: refetched, and it is gone
    assert loader.calls == 2


async def test_no_kid_matches_only_a_single_key(key: RSAKey, other_key: RSAKey) -> None:
    loader = Jwks(key)
    keys = KeySet("corp", loader, refetch_interval=0)
    assert (await keys.key(None)).as_dict() == key.as_dict(private=False)
    loader.keys = [key, other_key]
    keys = KeySet("corp", loader, refetch_interval=0)
    with pytest.raises(InvalidToken, match=r"signing key `\(none\)` is not known"):
        await keys.key(None)


async def test_fetch_failure_never_allows(key: RSAKey) -> None:
    clock = Clock(100.0)
    loader = Jwks(key)
    loader.fail = True
    keys = KeySet("corp", loader, refetch_interval=0, clock=clock)
    with pytest.raises(ServiceUnavailable, match="keys of issuer `corp` are not available"):
        await keys.key(key.kid)
    loader.fail = False
    await keys.key(key.kid)  # the endpoint is back: keys arrive
    loader.fail = True
    clock.now += 1000  # stale, and the refetch fails: the keys already known stay, nothing else
    await keys.key(key.kid)
    with pytest.raises(InvalidToken, match="is not known"):
        await keys.key("other")


async def test_concurrent_first_use_fetches_once(key: RSAKey) -> None:
    loader = Jwks(key)
    loader.delay = 0.05
    keys = KeySet("corp", loader, refetch_interval=30)
    await asyncio.gather(*(keys.key(key.kid) for _ in range(20)))
    assert loader.calls == 1


async def test_concurrent_requests_during_an_outage_do_not_queue_fetches(key: RSAKey) -> None:
    loader = Jwks(key)
    loader.fail = True
    loader.delay = 0.05
    keys = KeySet("corp", loader, refetch_interval=30)
    results = await asyncio.gather(*(keys.key(key.kid) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, ServiceUnavailable) for r in results)
    assert loader.calls == 1  # not one 5-second timeout per waiting request


async def test_file_loader(tmp_path: Path, key: RSAKey) -> None:
    path = tmp_path / "bundle.json"
    path.write_bytes(orjson.dumps({"keys": [key.as_dict(private=False)]}))
    assert await KeySet("corp", file_loader(path)).key(key.kid) is not None
    with pytest.raises(ServiceUnavailable):
        await KeySet("corp", file_loader(tmp_path / "missing.json")).key(key.kid)
    (tmp_path / "list.json").write_bytes(b"[]")
    with pytest.raises(ServiceUnavailable):
        await KeySet("corp", file_loader(tmp_path / "list.json")).key(key.kid)


@pytest.fixture
def idp(key: RSAKey) -> Iterator[tuple[AiohttpServer, dict[str, Any]]]:
    """A discovery endpoint whose document the test can change."""
    document: dict[str, Any] = {}

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response(document)

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [key.as_dict(private=False)]})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    server = AiohttpServer(app)
    document.update(issuer=server.url, jwks_uri=f"{server.url}/jwks")
    yield server, document
    server.stop()


async def test_discovery_finds_the_jwks_and_must_name_the_same_issuer(
    idp: tuple[AiohttpServer, dict[str, Any]], key: RSAKey
) -> None:
    server, document = idp
    async with aiohttp.ClientSession() as session:
        keys = KeySet("corp", http_loader(lambda: session, server.url, discovery=True), refetch_interval=0)
        assert await keys.key(key.kid) is not None
        # OpenID Connect Discovery 1.0 §4.3: the document's `issuer` must be the URL it was fetched for.
        document["issuer"] = "https://someone-else.example"
        keys = KeySet("corp", http_loader(lambda: session, server.url, discovery=True), refetch_interval=0)
        with pytest.raises(ServiceUnavailable):
            await keys.key(key.kid)


# -- the authenticator: what it refuses ----------------------------------------------


async def test_a_valid_token_becomes_a_caller(key: RSAKey) -> None:
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    token = sign(key, {"sub": "alice", "tenant": "acme", "groups": ["eng", "ops"], "jti": "t-1", "task": "task-9"})
    caller = await auth.authenticate(bearer(token))
    assert caller.subject.kind == "human" and caller.subject.id == "alice" and caller.subject.tenant == "acme"
    assert caller.subject.issuer == ISS and caller.subject.groups == ("eng", "ops")
    credential = caller.credential
    assert (credential.kind, credential.id, credential.issuer_name) == ("jwt", "t-1", "corp")
    assert credential.expires_at == NOW + 300 and credential.task == "task-9" and credential.binding == "none"
    assert caller.actors == () and caller.acting_agent is None
    anonymous = await auth.authenticate(bearer(sign(key, {"jti": None, "sub": "bob"})))
    assert anonymous.credential.id.startswith("sha256:") and len(anonymous.credential.id) == len("sha256:") + 16


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("abc", "not a JWT"),
        ("a.b", "not a JWT"),
        ("a.b.c.d", "not a JWT"),
        ("a.e30.c", "header is not base64url-encoded JSON"),
        (f"{b64(b'hello')}.e30.c", "header is not base64url-encoded JSON"),
        (f"{b64(b'[1]')}.e30.c", "header is not a JSON object"),
        (f"{RS256_HEADER}.{b64(b'hello')}.c", "payload is not base64url-encoded JSON"),
        (f"{RS256_HEADER}.{b64(b'[1]')}.c", "payload is not a JSON object"),
        (f"{RS256_HEADER}.{b64(bytes([0xFF, 0xFE]))}.c", "payload is not base64url-encoded JSON"),
    ],
)
async def test_malformed_tokens_are_refused(key: RSAKey, token: str, message: str) -> None:
    await refused(Authenticator([oidc(Jwks(key))], clock=Clock()), token, message)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_unsigned_tokens_are_refused(key: RSAKey, alg: str) -> None:
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    token = hand_made({"alg": alg, "typ": "JWT", "kid": key.kid}, claims_of())
    await refused(auth, token, r"unsigned tokens \(`alg: none`\) are not accepted")


async def test_alg_missing_or_not_a_string_is_refused(key: RSAKey) -> None:
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    await refused(auth, hand_made({"typ": "JWT"}, claims_of()), "unsigned tokens")
    await refused(auth, hand_made({"alg": ["RS256"]}, claims_of()), "unsigned tokens")


async def test_hmac_with_the_public_key_as_secret_is_refused(key: RSAKey) -> None:
    """The key-confusion attack: HS256 signed with the RSA public key an attacker can download."""
    public_pem = key.as_pem(private=False)
    forged = hand_made({"alg": "HS256", "typ": "JWT", "kid": key.kid}, claims_of(), secret=public_pem)
    rsa_only = Authenticator([oidc(Jwks(key))], clock=Clock())
    await refused(rsa_only, forged, "algorithm `HS256` is not allowed for issuer `corp`; allowed: ES256, ")
    # An issuer that does allow HS256 verifies it with its own secret, never with a key of its key set.
    secret = "a-shared-secret-of-thirty-two-bytes!"
    mixed = oidc(Jwks(key), algorithms=("RS256", "HS256"), hmac_secret={"env": "X"}, secret=secret)
    auth = Authenticator([mixed], clock=Clock())
    await refused(auth, forged, "token signature is invalid")
    genuine = hand_made({"alg": "HS256", "typ": "JWT"}, claims_of({"sub": "svc"}), secret=secret.encode())
    assert (await auth.authenticate(bearer(genuine))).subject.id == "svc"
    assert (await auth.authenticate(bearer(sign(key)))).subject.id == "alice"


@pytest.mark.parametrize("header", ["jwk", "jku", "x5u", "x5c"])
async def test_tokens_carrying_their_own_key_are_refused(key: RSAKey, header: str) -> None:
    attacker = rsa_key()
    value: Any = {
        "jwk": attacker.as_dict(private=False),
        "jku": "https://attacker.example/jwks",
        "x5u": "https://attacker.example/cert.pem",
        "x5c": ["MIIBszCCAVmgAwIBAgIUYQ=="],
    }[header]
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    # Even signed by a trusted key, a token that names a key of its own is refused.
    for signer in (attacker, key):
        token = sign(signer, header={header: value})
        await refused(auth, token, f"tokens that carry their own key \\(`{header}`\\) are not accepted")


async def test_critical_headers_are_refused(key: RSAKey) -> None:
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    token = hand_made({"alg": "RS256", "kid": key.kid, "crit": ["exp"]}, claims_of())
    await refused(auth, token, "critical header parameters")


async def test_issuer_must_be_trusted(key: RSAKey) -> None:
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    await refused(
        auth,
        sign(key, {"iss": "https://evil.example"}),
        "issuer `https://evil.example` is not trusted; trusted issuers: `corp`",
    )
    await refused(auth, sign(key, {"iss": None}), r"token has no issuer \(`iss`\)")
    await refused(auth, sign(key, {"iss": 7}), r"token has no issuer \(`iss`\)")


async def test_unknown_kid_and_wrong_signer_are_refused(key: RSAKey, other_key: RSAKey) -> None:
    loader = Jwks(key)
    auth = Authenticator([oidc(loader, refetch=0)], clock=Clock())
    await refused(auth, sign(other_key), f"signing key `{other_key.kid}` is not known for issuer `corp`")
    assert loader.calls == 2  # the first fetch, then one refetch for the unknown kid
    await refused(auth, sign(other_key, header={"kid": key.kid}), "token signature is invalid")
    tampered = sign(key).split(".")
    tampered[1] = b64(orjson.dumps(claims_of({"sub": "admin"})))
    await refused(auth, ".".join(tampered), "token signature is invalid")
    await refused(auth, hand_made({"alg": "RS256", "kid": 5}, claims_of()), "header `kid` must be a string")


async def test_algorithm_must_match_the_key(key: RSAKey) -> None:
    ec = ec_key()
    auth = Authenticator([oidc(Jwks(key, ec), refetch=0)], clock=Clock())
    await refused(auth, sign(ec, header={"kid": key.kid}, alg="ES256"), "token signature is invalid")
    await refused(auth, sign(key, header={"kid": ec.kid}), "token signature is invalid")
    only_rs = Authenticator([oidc(Jwks(key, ec), algorithms=("RS256",))], clock=Clock())
    await refused(only_rs, sign(ec, alg="ES256"), "algorithm `ES256` is not allowed for issuer `corp`; allowed: RS256")


@pytest.mark.parametrize(
    ("claims", "ttl", "message"),
    [
        ({}, -61, "token has expired"),
        ({"exp": None}, 300, r"token has no expiry \(`exp`\)"),
        ({"exp": "soon"}, 300, r"token has no expiry \(`exp`\)"),
        ({"exp": True}, 300, r"token has no expiry \(`exp`\)"),
        ({"nbf": int(NOW) + 61}, 300, "token is not valid yet"),
        ({"iat": int(NOW) + 61}, 300, "token was issued in the future"),
        ({"nbf": "now"}, 300, "claim `nbf` must be a number"),
        ({"aud": "someone-else"}, 300, "token audience `someone-else` is not accepted; expected `idgate-test`"),
        ({"aud": ["a", "b"]}, 300, "is not accepted"),
        ({"aud": None}, 300, r"token has no audience \(`aud`\)"),
        ({"aud": []}, 300, r"token has no audience \(`aud`\)"),
        ({"sub": None}, 300, "token has no subject claim `sub`"),
        ({"sub": 42}, 300, "claim `sub` must be a string"),
    ],
)
async def test_claims_are_checked(key: RSAKey, claims: dict[str, Any], ttl: int, message: str) -> None:
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    await refused(auth, sign(key, claims, ttl=ttl), message)


@pytest.mark.parametrize(
    ("claims", "ttl"),
    [({}, -59), ({"nbf": int(NOW) + 59}, 300), ({"iat": int(NOW) + 59}, 300), ({"aud": ["x", AUD]}, 300)],
)
async def test_within_the_clock_skew_is_accepted(key: RSAKey, claims: dict[str, Any], ttl: int) -> None:
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    assert (await auth.authenticate(bearer(sign(key, claims, ttl=ttl)))).subject.id == "alice"


async def test_clock_skew_is_configurable(key: RSAKey) -> None:
    strict = Authenticator([oidc(Jwks(key))], clock=Clock(), clock_skew=0)
    await refused(strict, sign(key, ttl=-1), "token has expired")


# -- the verified-token cache ------------------------------------------------------


async def test_a_verified_token_is_not_verified_again(key: RSAKey, monkeypatch: pytest.MonkeyPatch) -> None:
    verify = CountingVerify(monkeypatch)
    loader = Jwks(key)
    auth = Authenticator([oidc(loader)], clock=Clock())
    token = sign(key)
    first = await auth.authenticate(bearer(token))
    for _ in range(5):
        assert await auth.authenticate(bearer(token)) is first
    assert verify.calls == 1 and loader.calls == 1
    await auth.authenticate(bearer(sign(key, {"sub": "bob"})))
    assert verify.calls == 2


async def test_refused_tokens_are_not_cached(key: RSAKey, monkeypatch: pytest.MonkeyPatch) -> None:
    verify = CountingVerify(monkeypatch)
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    token = sign(key, {"aud": "someone-else"})
    for _ in range(3):
        await refused(auth, token, "is not accepted")
    assert verify.calls == 3


async def test_a_cached_token_still_expires(key: RSAKey) -> None:
    clock = Clock()
    auth = Authenticator([oidc(Jwks(key))], clock=clock)
    token = sign(key, ttl=10)
    await auth.authenticate(bearer(token))
    clock.now += 10 + 60  # at the edge of the skew: still good
    await auth.authenticate(bearer(token))
    clock.now += 1
    await refused(auth, token, "token has expired")


async def test_a_cached_token_dies_with_its_key(
    key: RSAKey, other_key: RSAKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = Jwks(key)
    auth = Authenticator([oidc(loader, refetch=0)], clock=Clock())
    old = sign(key)
    await auth.authenticate(bearer(old))
    loader.keys = [other_key]  # rotation: the old key is withdrawn
    await auth.authenticate(bearer(sign(other_key)))  # its unknown kid refetches the set
    await refused(auth, old, f"signing key `{key.kid}` is not known")


async def test_a_cached_token_without_kid_dies_with_its_key(key: RSAKey, other_key: RSAKey) -> None:
    """With a single key, a token may omit `kid`; removing that key must still end the cached token."""
    loader = Jwks(key)
    auth = Authenticator([oidc(loader, refetch=0)], clock=Clock())
    old = sign(key, header={"kid": None})
    assert "kid" not in orjson.loads(base64.urlsafe_b64decode(old.split(".")[0] + "=="))
    await auth.authenticate(bearer(old))
    loader.keys = [other_key]
    await auth.authenticate(bearer(sign(other_key)))
    await refused(auth, old, "token signature is invalid")


async def test_the_cache_is_bounded(key: RSAKey, monkeypatch: pytest.MonkeyPatch) -> None:
    verify = CountingVerify(monkeypatch)
    auth = Authenticator([oidc(Jwks(key))], clock=Clock(), cache_size=2)
    tokens = [sign(key, {"sub": f"user{i}"}) for i in range(3)]
    for token in tokens:
        await auth.authenticate(bearer(token))
    assert verify.calls == 3
    await auth.authenticate(bearer(tokens[0]))  # the oldest was evicted
    assert verify.calls == 4
    await auth.authenticate(bearer(tokens[2]))  # the newest was kept
    assert verify.calls == 4


async def test_a_full_cache_sweeps_expired_tokens_at_most_once_a_second(
    key: RSAKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sweeping reads the whole cache; per insert it let many distinct tokens slow every call down."""
    verify = CountingVerify(monkeypatch)
    clock = Clock()
    auth = Authenticator([oidc(Jwks(key))], clock=clock, cache_size=3, clock_skew=0)
    a, b = (sign(key, {"sub": s}) for s in ("a", "b"))
    short = sign(key, {"sub": "short"}, ttl=1)
    for token in (a, b, short):
        await auth.authenticate(bearer(token))
    clock.now += 0.1
    await auth.authenticate(bearer(sign(key, {"sub": "d"}, now=clock.now)))  # full: sweeps (nothing), evicts `a`
    clock.now += 0.95  # `short` has expired, but the last sweep was under a second ago ...
    await auth.authenticate(bearer(sign(key, {"sub": "e"}, now=clock.now)))
    calls = verify.calls
    await auth.authenticate(bearer(b))  # ... so the oldest (`b`) made room, not the expired one
    assert verify.calls == calls + 1


# -- claim mapping -----------------------------------------------------------------


async def test_claim_mapping_is_configurable(key: RSAKey) -> None:
    claims = ClaimsConfig(
        subject="email",
        tenant="org",
        default_tenant="fallback",
        groups="roles",
        kind=None,
        kind_rules=(KindRule(claim="client_id", kind="service"), KindRule(claim="typ2", equals="bot", kind="agent")),
        default_kind="human",
    )
    auth = Authenticator([oidc(Jwks(key), claims=claims)], clock=Clock())

    async def caller(extra: dict[str, Any]) -> Caller:
        return await auth.authenticate(bearer(sign(key, {"email": "a@x", **extra})))

    person = await caller({"org": "acme", "roles": "read write", "kind": "agent"})
    assert (person.subject.id, person.subject.tenant, person.subject.groups) == ("a@x", "acme", ("read", "write"))
    assert person.subject.kind == "human"  # `kind` is not the configured claim here
    assert (await caller({"client_id": "c1"})).subject.kind == "service"
    assert (await caller({"typ2": "bot"})).subject.kind == "agent"
    assert (await caller({"typ2": "person"})).subject.kind == "human"
    assert (await caller({})).subject.tenant == "fallback"
    await refused(auth, sign(key, {"email": "b@x", "roles": [1, 2]}), "claim `roles` must be a list of strings")
    await refused(auth, sign(key, {"email": "b@x", "org": ["a"]}), "claim `org` must be a string")
    await refused(auth, sign(key), "token has no subject claim `email`")


async def test_declared_kind_is_checked(key: RSAKey) -> None:
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    assert (await auth.authenticate(bearer(sign(key, {"kind": "agent"})))).subject.kind == "agent"
    await refused(auth, sign(key, {"kind": "admin"}), "claim `kind` `admin` must be one of human, service, agent")


def test_actor_chain_is_outermost_first() -> None:
    claims = {
        "act": {
            "sub": "outer",
            "iss": "https://a",
            "act": {"sub": "middle", "kind": "service", "act": {"sub": "inner"}},
        }
    }
    assert actor_chain(claims) == (
        Actor("outer", "agent", "https://a"),
        Actor("middle", "service", None),
        Actor("inner", "agent", None),
    )
    assert actor_chain({}) == ()


@pytest.mark.parametrize(
    ("act", "message"),
    [
        ("agent-1", "must be an object with a `sub` string"),
        ({"kind": "agent"}, "must be an object with a `sub` string"),
        ({"sub": ""}, "must be an object with a `sub` string"),
        ({"sub": "a", "act": {"sub": 5}}, "must be an object with a `sub` string"),
        ({"sub": "a", "kind": "root"}, "`act.kind` `root` must be one of"),
    ],
)
def test_bad_actor_claims_are_refused(act: Any, message: str) -> None:
    with pytest.raises(InvalidToken, match=message):
        actor_chain({"act": act})


def test_actor_chain_depth_is_bounded() -> None:
    act: dict[str, Any] = {"sub": "a0"}
    for i in range(1, MAX_ACTOR_DEPTH):
        act = {"sub": f"a{i}", "act": act}
    assert len(actor_chain({"act": act})) == MAX_ACTOR_DEPTH
    with pytest.raises(InvalidToken, match=f"nests deeper than {MAX_ACTOR_DEPTH}"):
        actor_chain({"act": {"sub": "one-too-many", "act": act}})


async def test_actor_chain_reaches_the_caller(key: RSAKey) -> None:
    auth = Authenticator([oidc(Jwks(key))], clock=Clock())
    caller = await auth.authenticate(bearer(sign(key, {"act": {"sub": "planner", "act": {"sub": "browser"}}})))
    assert [a.id for a in caller.actors] == ["planner", "browser"]
    assert caller.acting_agent == Actor("planner")


# -- SPIFFE JWT-SVIDs --------------------------------------------------------------


def spiffe_issuer(loader: Jwks, **overrides: Any) -> SpiffeIssuer:
    values: dict[str, Any] = {
        "name": "mesh",
        "trust_domain": "example.org",
        "jwks_file": "/nonexistent/bundle.json",
        "tenant": "ops",
        "rules": [
            SpiffeRule(path_prefix="/agents", kind="agent", tenant="acme"),
            SpiffeRule(path_prefix="/people/", kind="human"),
        ],
        **overrides,
    }
    config = SpiffeIssuerConfig.model_validate(values)
    return SpiffeIssuer(config, KeySet("mesh", loader, use="jwt-svid", refetch_interval=0), (AUD,))


def svid(key: ECKey, spiffe_id: str, *, header: dict[str, Any] | None = None, **claims: Any) -> str:
    body = {"iss": None, "sub": spiffe_id, **claims}
    return sign(key, body, header=header, alg="ES256")


@pytest.fixture(scope="module")
def svid_key() -> ECKey:
    return ec_key()


@pytest.mark.parametrize(
    ("spiffe_id", "kind", "tenant"),
    [
        ("spiffe://example.org/agents/a1", "agent", "acme"),
        ("spiffe://example.org/agents", "agent", "acme"),
        ("spiffe://example.org/people/p1", "human", "ops"),
        ("spiffe://example.org/agentsmith", "service", "ops"),  # a prefix is whole path segments
        ("spiffe://example.org/agents-evil/a1", "service", "ops"),
        ("spiffe://example.org/ns/default/sa/web", "service", "ops"),
    ],
)
async def test_spiffe_rules_map_paths_to_kinds(svid_key: ECKey, spiffe_id: str, kind: str, tenant: str) -> None:
    auth = Authenticator([spiffe_issuer(Jwks(svid_key, use="jwt-svid"))], clock=Clock())
    caller = await auth.authenticate(bearer(svid(svid_key, spiffe_id)))
    assert (caller.subject.id, caller.subject.kind, caller.subject.tenant) == (spiffe_id, kind, tenant)
    assert caller.subject.issuer == "spiffe://example.org"
    assert caller.credential.kind == "jwt-svid" and caller.credential.issuer_name == "mesh"


async def test_spiffe_refusals(svid_key: ECKey) -> None:
    x509 = ec_key()
    loader = Jwks(svid_key, use="jwt-svid")
    loader.extra = [{**x509.as_dict(private=False), "use": "x509-svid"}]
    auth = Authenticator([spiffe_issuer(loader)], clock=Clock())
    good = "spiffe://example.org/agents/a1"
    await refused(
        auth, svid(svid_key, "spiffe://other.org/agents/a1"), "SPIFFE trust domain `other.org` is not trusted"
    )
    await refused(auth, svid(svid_key, good, aud=None), r"token has no audience \(`aud`\)")
    await refused(auth, svid(svid_key, good, header={"kid": None}), "JWT-SVID header has no `kid`")
    await refused(auth, svid(svid_key, good, header={"typ": "at+jwt"}), "JWT-SVID header `typ` `at\\+jwt` must be")
    await refused(auth, svid(x509, good), f"signing key `{x509.kid}` is not known for issuer `mesh`")
    await refused(auth, svid(svid_key, good, exp=None), r"token has no expiry \(`exp`\)")
    await refused(auth, svid(svid_key, "spiffe://example.org/a//b"), "JWT-SVID `sub` is not a SPIFFE ID")
    forged = hand_made({"alg": "HS256", "kid": svid_key.kid}, claims_of({"iss": None, "sub": good}), secret=b"s")
    await refused(auth, forged, "algorithm `HS256` is not allowed for issuer `mesh`")


def test_spiffe_issuer_maps_only_its_own_trust_domain(svid_key: ECKey) -> None:
    issuer = spiffe_issuer(Jwks(svid_key, use="jwt-svid"))
    with pytest.raises(
        InvalidToken, match=re.escape("SPIFFE ID `spiffe://other.org/a` is not in trust domain `example.org`")
    ):
        issuer.caller({"sub": "spiffe://other.org/a"}, "sha256:00", NOW)
    with pytest.raises(InvalidToken, match="JWT-SVID `sub` is not a SPIFFE ID"):
        issuer.caller({"sub": 5}, "sha256:00", NOW)


# -- configuration -----------------------------------------------------------------


def test_hmac_without_a_secret_is_refused_at_parse_time() -> None:
    data = {
        "issuers": [{"name": "corp", "issuer": ISS, "jwks_uri": "https://idp/jwks", "algorithms": ["RS256", "HS256"]}]
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, {})
    assert caught.value.problems == ["issuers[0]: algorithms ['HS256'] need `hmac_secret`"]


@pytest.mark.parametrize(
    ("entry", "where", "message"),
    [
        ({"algorithms": ["HS256"], "hmac_secret": "inline"}, "issuers[1].hmac_secret", "not allowed inline"),
        ({"hmac_secret": {"env": "X"}}, "issuers[1]", "no HMAC algorithm is allowed"),
        ({"algorithms": []}, "issuers[1].algorithms", "at least one algorithm"),
        ({"algorithms": ["none"]}, "issuers[1].algorithms[0]", "expected one of"),
        ({"jwks_uri": None}, "issuers[1]", "give one of `discovery: true`, `jwks_uri` or `jwks_file`"),
    ],
)
def test_bad_issuer_entries_name_their_key(entry: dict[str, Any], where: str, message: str) -> None:
    good = {"name": "corp", "issuer": ISS, "jwks_uri": "https://idp/jwks"}
    second = {**good, "name": "second", "issuer": "https://b", **entry}
    with pytest.raises(ConfigError) as caught:
        parse_config({"issuers": [good, {k: v for k, v in second.items() if v is not None}]}, {})
    assert any(p.startswith(f"{where}: ") and message in p for p in caught.value.problems), caught.value.problems


def test_spiffe_entries_are_checked() -> None:
    base = {"name": "mesh", "trust_domain": "example.org", "jwks_file": "/bundle.json"}
    with pytest.raises(ConfigError) as caught:
        parse_config({"spiffe": [{**base, "algorithms": ["HS256"]}]}, {})
    assert caught.value.problems == ["spiffe[0]: JWT-SVIDs are signed with RS, PS or ES algorithms only"]
    with pytest.raises(ConfigError) as caught:
        parse_config({"spiffe": [{**base, "trust_domain": "Example.org"}]}, {})
    assert caught.value.problems[0].startswith("spiffe[0].trust_domain: ")
    with pytest.raises(ConfigError) as caught:
        parse_config({"spiffe": [{**base, "rules": [{"path_prefix": "agents", "kind": "agent"}]}]}, {})
    assert caught.value.problems[0].startswith("spiffe[0].rules[0].path_prefix: ")
