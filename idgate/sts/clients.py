"""Clients of the token service, and how they prove who they are: keys, never secrets.

A registered client (`sts.clients`) authenticates at `POST /oauth2/token` with
a *client assertion*:

- `private_key_jwt` (RFC 7523 §2.2, `client_assertion_type=
  urn:ietf:params:oauth:client-assertion-type:jwt-bearer`): a JWT it signs with
  its own private key; the gateway holds only the public keys (a JWKS file,
  URL or inline). Checked: an asymmetric allowed `alg` (never `none` or HMAC),
  no key carried in the token, `iss` = `sub` = the client id, `aud` the token
  endpoint or the issuer (RFC 7523 §3, and the issuer alone as RFC 7523bis
  asks), `exp` present and at most `sts.client_assertion_max_lifetime_seconds`
  ahead, `nbf`/`iat` not in the future, and a `jti` not seen before (the replay
  cache shared by every worker).
- a SPIFFE JWT-SVID (`...:client-assertion-type:jwt-spiffe`, or the generic
  `jwt-bearer` type, which workload-identity clients use): verified like any
  JWT-SVID of a trusted trust domain, with the token endpoint or the issuer as
  audience; the client is its SPIFFE ID, registered (kind, tenant, scope,
  audiences) or not (kind and tenant by the trust domain's rules). Its `jti`,
  when it has one, is single-use too.

Client secrets (`client_secret`, HTTP Basic) are refused with `invalid_client`:
a shared secret is what this gateway exists to replace.

`ClientCredentials` is the `client_credentials` grant (RFC 6749 §4.4): an
authenticated client gets its own short-lived gateway token, its scope at most
the registered one, its audience one of the registered ones, policy permitting.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import orjson
from joserfc import jws
from joserfc.errors import JoseError

from idgate.errors import AuthenticationError, ServiceUnavailable, shown
from idgate.identity.authenticator import Authenticator
from idgate.identity.keys import JWKSLoader, KeySet, file_loader, http_loader
from idgate.identity.principal import Caller, Credential, Kind, Principal
from idgate.identity.replay import ReplayCache
from idgate.policy.decision import Authorizer
from idgate.sts.client_settings import ClientSettings
from idgate.sts.errors import InvalidClient, InvalidRequest, InvalidScope, InvalidTarget, TemporarilyUnavailable
from idgate.sts.exchange import ACCESS_TOKEN, Issued, authorize_audience, check_alive
from idgate.sts.tokens import Binding, Grant, TokenMinter

if TYPE_CHECKING:
    from idgate.sts.revocation import Liveness

__all__ = [
    "JWT_BEARER_ASSERTION",
    "SPIFFE_ASSERTION",
    "Client",
    "ClientAuthenticator",
    "ClientCredentials",
    "client_keysets",
]

JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SPIFFE_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
_EMBEDDED_KEY_HEADERS = ("jwk", "jku", "x5u", "x5c")
_MAX_JTI = 256


@dataclass(frozen=True, slots=True)
class Client:
    """An authenticated client: who it is as a principal, and the most its tokens may hold."""

    id: str
    kind: Kind
    tenant: str | None
    issuer: str  # who vouches for it: the gateway (registered keys) or its SPIFFE trust domain
    method: Literal["private_key_jwt", "jwt-spiffe"]
    scope: tuple[str, ...] | None  # None: tokens carry no scope
    audiences: tuple[str, ...]  # empty: the default audience only
    expires_at: float  # of the assertion that authenticated it
    issued_at: float | None = None  # the assertion's `iat`: a kill switch ends the assertions issued until then

    @property
    def caller(self) -> Caller:
        principal = Principal(self.kind, self.id, self.tenant, self.issuer)
        kind: Literal["jwt", "jwt-svid"] = "jwt-svid" if self.method == "jwt-spiffe" else "jwt"
        credential = Credential(kind, f"client:{self.id}", "client", self.expires_at, issued_at=self.issued_at)
        return Caller(principal, credential)


def _b64json(segment: str) -> dict[str, Any]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        raise InvalidClient("`client_assertion` is not a JWT (its parts are not base64url-encoded JSON)") from None
    if not isinstance(value, dict):
        raise InvalidClient("`client_assertion` is not a JWT (a part is not a JSON object)")
    return value


def _inline_loader(document: dict[str, Any]) -> JWKSLoader:
    async def load() -> dict[str, Any]:
        return document

    return load


def client_keysets(
    clients: tuple[ClientSettings, ...], session: Callable[[], aiohttp.ClientSession] | None
) -> dict[str, KeySet]:
    """The public keys of each registered key-holding client, by client id."""
    keysets: dict[str, KeySet] = {}
    for client in clients:
        loader: JWKSLoader
        if client.jwks is not None:
            loader = _inline_loader(client.jwks)
        elif client.jwks_file is not None:
            loader = file_loader(Path(client.jwks_file))
        elif client.jwks_uri is not None and session is not None:
            loader = http_loader(session, client.jwks_uri, discovery=False)
        else:
            continue  # a SPIFFE client: its trust domain's bundle holds the keys
        keysets[client.client_id] = KeySet(f"client {client.client_id}", loader, refetch_interval=30.0)
    return keysets


class ClientAuthenticator:
    """Authenticates the client of a token request, or says there is none (a public client)."""

    def __init__(
        self,
        clients: tuple[ClientSettings, ...],
        keysets: dict[str, KeySet],
        authenticator: Authenticator,
        replay: ReplayCache,
        *,
        issuer: str,
        token_endpoint: str,
        max_lifetime: float,
        clock_skew: float = 60.0,
        clock: Callable[[], float] = time.time,
        liveness: Liveness | None = None,
    ) -> None:
        """`liveness`: refuse a client whose assertion, subject, agent or tenant was revoked (kill switch)."""
        self._liveness = liveness
        self._clients = {c.client_id: c for c in clients}
        self._keysets = keysets
        self._authenticator = authenticator
        self._replay = replay
        self._issuer = issuer
        # RFC 7523 §3: the token endpoint or the issuer; RFC 7523bis: the issuer. A root URL with or without `/`.
        self.audiences = frozenset({issuer, issuer + "/", token_endpoint})
        self._max_lifetime = max_lifetime
        self._skew = clock_skew
        self._clock = clock

    async def authenticate(self, authorization: bytes | None, params: dict[str, list[str]]) -> Client | None:
        """The authenticated client, or None when the request names no client credentials at all."""
        if authorization is not None:
            scheme = authorization.split(b" ", 1)[0].strip().lower()
            if scheme == b"basic":
                raise InvalidClient(
                    "client secrets (HTTP Basic) are not supported: authenticate with `private_key_jwt` or a JWT-SVID"
                )
            raise InvalidClient(
                "send no `Authorization` header to the token endpoint; authenticate with a client assertion"
            )
        if "client_secret" in params:
            raise InvalidClient("client secrets are not supported: authenticate with `private_key_jwt` or a JWT-SVID")
        assertion_type = _one(params, "client_assertion_type")
        assertion = _one(params, "client_assertion")
        client_id = _one(params, "client_id")
        if assertion_type is None and assertion is None:
            if client_id is not None and client_id in self._clients:
                raise InvalidClient(
                    f"client `{shown(client_id)}` is registered: authenticate it with a client assertion"
                )
            return None
        if assertion_type is None or assertion is None:
            raise InvalidRequest("`client_assertion` and `client_assertion_type` go together: give both")
        if assertion_type == JWT_BEARER_ASSERTION and self._is_svid(assertion):
            # Workload-identity clients (e.g. the `mcp` SDK's private_key_jwt provider) send a JWT-SVID
            # under the generic type: the token decides how it is verified, the type only names the family.
            client = await self._jwt_svid(assertion)
        elif assertion_type == JWT_BEARER_ASSERTION:
            client = await self._private_key_jwt(assertion)
        elif assertion_type == SPIFFE_ASSERTION:
            client = await self._jwt_svid(assertion)
        else:
            raise InvalidClient(
                f"`client_assertion_type` `{shown(assertion_type)}` is not supported; "
                f"supported: `{JWT_BEARER_ASSERTION}`, `{SPIFFE_ASSERTION}`"
            )
        if client_id is not None and client_id != client.id:
            raise InvalidClient("`client_id` is not the client the assertion authenticates")
        return client

    def _is_svid(self, assertion: str) -> bool:
        """A JWT-SVID: `sub` a SPIFFE ID, and no `iss` of a client registered with keys."""
        parts = assertion.split(".")
        if len(parts) != 3:
            return False
        try:
            claims = _b64json(parts[1])
        except InvalidClient:
            return False
        sub, iss = claims.get("sub"), claims.get("iss")
        return (
            isinstance(sub, str) and sub.startswith("spiffe://") and not (isinstance(iss, str) and iss in self._keysets)
        )

    async def _private_key_jwt(self, assertion: str) -> Client:
        parts = assertion.split(".")
        if len(parts) != 3:
            raise InvalidClient("`client_assertion` is not a JWT (expected three `.`-separated parts)")
        header, claims = _b64json(parts[0]), _b64json(parts[1])
        iss, sub = claims.get("iss"), claims.get("sub")
        if not isinstance(iss, str) or not iss:
            raise InvalidClient("`client_assertion` has no `iss` (the client id)")
        registered = self._clients.get(iss)
        keyset = self._keysets.get(iss)
        if registered is None or keyset is None:
            raise InvalidClient(f"client `{shown(iss)}` is not registered for `private_key_jwt`")
        if sub != iss:
            raise InvalidClient("`client_assertion` must have `sub` equal to `iss` (the client id)")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in registered.algorithms:
            raise InvalidClient(
                f"`client_assertion` algorithm `{shown(alg)}` is not allowed; "
                f"allowed: {', '.join(registered.algorithms)}"
            )
        embedded = [h for h in _EMBEDDED_KEY_HEADERS if h in header]
        if embedded:
            raise InvalidClient(f"`client_assertion` must not carry its own key (`{embedded[0]}`)")
        if header.get("crit"):
            raise InvalidClient("`client_assertion` has critical header parameters this gateway does not understand")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidClient("`client_assertion` header `kid` must be a string")
        try:
            _, key = await keyset.resolve(kid)
        except ServiceUnavailable:
            raise TemporarilyUnavailable(f"the keys of client `{shown(iss)}` are not available right now") from None
        except AuthenticationError as exc:
            raise InvalidClient(f"`client_assertion`: {exc.message}") from None
        try:
            jws.deserialize_compact(assertion, key, algorithms=[alg])
        except (JoseError, ValueError, TypeError):
            raise InvalidClient("`client_assertion` signature is invalid") from None
        aud = claims.get("aud")
        values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self.audiences.isdisjoint(v for v in values if isinstance(v, str)):
            raise InvalidClient(
                f"`client_assertion` audience must be `{self._issuer}` (the issuer) or the token endpoint"
            )
        expires_at = self._times(claims)
        await self._single_use(iss, claims, expires_at, required=True)
        iat = claims.get("iat")
        client = Client(
            iss,
            registered.kind,
            registered.tenant,
            self._issuer,
            "private_key_jwt",
            registered.scope or None,
            registered.audiences,
            expires_at,
            float(iat) if isinstance(iat, (int, float)) else None,
        )
        await check_alive(self._liveness, client.caller, "client_assertion", InvalidClient)
        return client

    async def _jwt_svid(self, assertion: str) -> Client:
        try:
            caller, claims = await self._authenticator.verify_assertion(assertion, self.audiences)
        except ServiceUnavailable:
            raise TemporarilyUnavailable(
                "the JWT-SVID cannot be checked now: its trust bundle is unavailable"
            ) from None
        except AuthenticationError as exc:
            raise InvalidClient(f"`client_assertion` (JWT-SVID) is not valid: {exc.message}") from None
        subject = caller.subject
        if caller.credential.kind != "jwt-svid":
            raise InvalidClient("`client_assertion` of type `jwt-spiffe` must be a JWT-SVID of a trusted trust domain")
        await self._single_use(subject.id, claims, caller.credential.expires_at, required=False)
        await check_alive(self._liveness, caller, "client_assertion", InvalidClient)
        registered = self._clients.get(subject.id)
        if registered is None:
            return Client(
                subject.id,
                subject.kind,
                subject.tenant,
                subject.issuer,
                "jwt-spiffe",
                None,
                (),
                caller.credential.expires_at,
            )
        return Client(
            subject.id,
            registered.kind,
            registered.tenant or subject.tenant,
            subject.issuer,
            "jwt-spiffe",
            registered.scope or None,
            registered.audiences,
            caller.credential.expires_at,
        )

    def _times(self, claims: dict[str, Any]) -> float:
        now = self._clock()
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise InvalidClient("`client_assertion` has no expiry (`exp`)")
        if now > exp + self._skew:
            raise InvalidClient("`client_assertion` has expired")
        if exp > now + self._max_lifetime + self._skew:
            raise InvalidClient(f"`client_assertion` must expire within {int(self._max_lifetime)} seconds")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InvalidClient(f"`client_assertion` claim `{name}` must be a number")
            if value > now + self._skew:
                raise InvalidClient(f"`client_assertion` `{name}` is in the future")
        return float(exp)

    async def _single_use(self, client_id: str, claims: dict[str, Any], expires_at: float, *, required: bool) -> None:
        jti = claims.get("jti")
        if jti is None and not required:
            return
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_JTI:
            raise InvalidClient("`client_assertion` has no valid `jti` (a unique id, so it is used once)")
        if not await self._replay.first_use("client", f"{client_id}\0{jti}", expires_at + self._skew):
            raise InvalidClient("`client_assertion` was used before (`jti` replay)")


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


class ClientCredentials:
    """The `client_credentials` grant: a client's own short-lived gateway token."""

    def __init__(
        self,
        authorizer: Authorizer,
        minter: TokenMinter,
        *,
        default_audience: str,
        public_url: str,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
        gateway_audiences: tuple[str, ...] = (),
    ) -> None:
        """`gateway_audiences`: the gateway's own accepted audiences (its MCP resources among them)."""
        self._authorizer = authorizer
        self._minter = minter
        self._default_audience = default_audience
        self._public_url = public_url.rstrip("/")
        # A client registered without audiences may have a token for any of the gateway's own.
        self._gateway_audiences = tuple(dict.fromkeys((default_audience, *gateway_audiences)))
        self._ttl = ttl_seconds
        self._clock = clock

    def audience(self, value: str) -> str:
        """The audience a `resource` (RFC 8707) names: the gateway's bare URL is the gateway as a whole
        (its default audience); one of its accepted audiences (an MCP server's `{url}/mcp/{name}`) stays
        itself, so the token is good there only; any other URL under the gateway is no resource of it."""
        if value.rstrip("/") == self._public_url:
            return self._default_audience
        if value in self._gateway_audiences:
            return value
        if value.startswith(self._public_url + "/"):
            raise InvalidTarget(f"`resource` `{shown(value)}` is not a resource of this gateway")
        return value

    def _wider(self, audience: str) -> str | None:
        """The gateway's default audience, for a token asked for another of the gateway's own audiences."""
        return self._default_audience if audience in self._gateway_audiences else None

    def issue(
        self,
        client: Client,
        *,
        scope: tuple[str, ...] | None,
        resources: tuple[str, ...],
        audiences: tuple[str, ...],
        binding: Binding,
    ) -> Issued:
        granted = self._scope(client, scope)
        asked = tuple(dict.fromkeys(self.audience(a) for a in (*resources, *audiences)))
        allowed = client.audiences or self._gateway_audiences
        wider = [a for a in asked if a not in allowed]
        if wider:
            raise InvalidTarget(f"client `{shown(client.id)}` may not have tokens for `{shown(wider[0])}`")
        chosen = asked or (allowed[0],)
        caller = client.caller
        decisions = tuple(
            authorize_audience(self._authorizer, caller, audience, "client", wider=self._wider(audience))
            for audience in chosen
        )
        now = self._clock()
        grant = Grant(
            subject=caller.subject,
            subject_issuer=client.issuer,
            audiences=chosen,
            expires_at=int(now + self._ttl),
            scope=granted,
            cnf=binding.cnf,
            claims={"client_id": client.id},
        )
        return Issued(self._minter.mint(grant), ACCESS_TOKEN, granted, caller, decisions)

    @staticmethod
    def _scope(client: Client, asked: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if asked is None:
            return client.scope
        held = client.scope or ()
        extra = [s for s in asked if s not in held]
        if extra:
            raise InvalidScope(f"scope `{shown(extra[0])}` is more than client `{shown(client.id)}` is registered for")
        return asked
