"""The OAuth endpoints of the token service, on the gateway's raw ASGI layer.

- `POST /oauth2/token`, form-encoded (RFC 6749 §3.2); answers and errors as
  RFC 6749 §5.1/§5.2 JSON with `Cache-Control: no-store`. Grants:
  token exchange (RFC 8693), the JWT bearer grant (RFC 7523 §2.1: `assertion`,
  a token of a trusted issuer or a JWT-SVID, for a gateway token of its
  subject) and `client_credentials` (an authenticated client's own token).
- `GET /.well-known/jwks.json`: the public signing keys, current first.
- `GET /.well-known/oauth-authorization-server`: RFC 8414 metadata.

Client authentication (`idgate.sts.clients`): `private_key_jwt` or a JWT-SVID;
secrets and HTTP Basic are refused with 401 `invalid_client`. Token exchange
and the JWT bearer grant also serve public clients (the tokens are the proof).

Sender constraint: a request with a valid `DPoP` proof (RFC 9449 §5) gets a
token bound to the proof's key (`cnf.jkt`, `token_type: DPoP`); one arriving
over mTLS with a client certificate gets it bound to the certificate
(`cnf.x5t#S256`, RFC 8705) unless `sts.certificate_bound_tokens` is off.
A bound token presented in the request is only accepted with a proof of its
key or certificate. Proof errors: 400 `invalid_dpop_proof`, or
`use_dpop_nonce` with a fresh `DPoP-Nonce` header.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from idgate.audit.records import exchange_record
from idgate.errors import AuthenticationError, BadRequest, PayloadTooLarge, ServiceUnavailable
from idgate.identity.dpop import DPoPVerifier, ProofError, single_proof
from idgate.proxy.http import Request, Send, send_bytes
from idgate.sts.client_settings import ASYMMETRIC
from idgate.sts.clients import Client, ClientAuthenticator, ClientCredentials
from idgate.sts.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    OAuthError,
    TemporarilyUnavailable,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from idgate.sts.exchange import (
    JWT,
    SUBJECT_TOKEN_TYPES,
    ExchangeRequest,
    Issued,
    TokenExchange,
    check_alive,
    parse_scope,
)
from idgate.sts.keys import SigningKeys
from idgate.sts.tokens import Binding

if TYPE_CHECKING:
    from idgate.sts.revocation import Liveness

__all__ = [
    "CLIENT_CREDENTIALS",
    "JWT_BEARER",
    "TOKEN_EXCHANGE",
    "Handler",
    "InvalidDPoPProof",
    "OAuthEndpoints",
    "UseDPoPNonce",
]

log = logging.getLogger("idgate.sts")

Handler = Callable[[Request, Send], Awaitable[None]]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a URN, not a secret
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_CREDENTIALS = "client_credentials"
GRANT_TYPES = (TOKEN_EXCHANGE, JWT_BEARER, CLIENT_CREDENTIALS)
FORM = b"application/x-www-form-urlencoded"
NO_STORE = ((b"cache-control", b"no-store"), (b"pragma", b"no-cache"))
# RFC 8693 §2.1: `resource` and `audience` may repeat; every other parameter is given at most once.
_REPEATABLE = frozenset({"resource", "audience"})
_SECRET_PARAMS = ("subject_token", "actor_token", "client_secret", "client_assertion", "assertion")


class InvalidDPoPProof(OAuthError):
    """RFC 9449 §5: the token request's DPoP proof is missing something or wrong."""

    error = "invalid_dpop_proof"


class UseDPoPNonce(OAuthError):
    """RFC 9449 §8: the proof must carry the server's nonce, sent along in `DPoP-Nonce`."""

    error = "use_dpop_nonce"


def _parse_form(body: bytes) -> dict[str, list[str]]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=False, strict_parsing=False, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest(
            "the request body is not a valid UTF-8 form (`application/x-www-form-urlencoded`)"
        ) from None
    params: dict[str, list[str]] = {}
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    for name, values in params.items():
        if len(values) > 1 and name not in _REPEATABLE:
            raise InvalidRequest(f"parameter `{name[:40]}` is given more than once")
    return params


def _one(params: dict[str, list[str]], name: str, *, required: bool = False) -> str | None:
    values = params.get(name)
    if not values:
        if required:
            raise InvalidRequest(f"parameter `{name}` is missing")
        return None
    return values[0]


def _exchange_request(params: dict[str, list[str]]) -> ExchangeRequest:
    subject_token = _one(params, "subject_token", required=True)
    subject_type = _one(params, "subject_token_type", required=True)
    assert subject_token is not None and subject_type is not None
    supported = ", ".join(f"`{t}`" for t in SUBJECT_TOKEN_TYPES)
    if subject_type not in SUBJECT_TOKEN_TYPES:
        raise InvalidRequest(f"`subject_token_type` `{subject_type[:80]}` is not supported; supported: {supported}")
    actor_token = _one(params, "actor_token")
    actor_type = _one(params, "actor_token_type")
    if (actor_token is None) != (actor_type is None):
        raise InvalidRequest("`actor_token` and `actor_token_type` go together: give both or neither")
    if actor_type is not None and actor_type not in SUBJECT_TOKEN_TYPES:
        raise InvalidRequest(f"`actor_token_type` `{actor_type[:80]}` is not supported; supported: {supported}")
    scope = _one(params, "scope")
    return ExchangeRequest(
        subject_token=subject_token,
        subject_token_type=subject_type,
        actor_token=actor_token,
        actor_token_type=actor_type,
        scope=parse_scope(scope) if scope is not None else None,
        resources=tuple(params.get("resource", ())),
        audiences=tuple(params.get("audience", ())),
        requested_token_type=_one(params, "requested_token_type"),
        task=_one(params, "task"),
    )


class OAuthEndpoints:
    """The handlers; `routes()` gives them by path and method for the app's route table."""

    def __init__(
        self,
        exchange: TokenExchange,
        keys: SigningKeys,
        *,
        max_body_bytes: int,
        clients: ClientAuthenticator,
        client_credentials: ClientCredentials,
        dpop: DPoPVerifier,
        record: Callable[[dict[str, Any]], None] | None = None,
        peer_thumbprint: Callable[[Request], str | None] | None = None,
        bind_certificates: bool = True,
        metadata: dict[str, Any] | None = None,
        commit: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        """`record`: where each exchange's audit record goes (it raises when it cannot take one).
        `liveness`: the last check before a token is minted: whoever it is issued to (the subject, every
        actor, the client with its registered tenant) must not be revoked or held by the kill switch.
        `commit`: how an issued token's record is committed before the token is sent (e.g.
        `AuditWriter.commit`; it raises `ServiceUnavailable` when it cannot); without it, `record`.
        `metadata`: more RFC 8414 members (e.g. the revocation and introspection endpoints).

        `peer_thumbprint`: the SHA-256 thumbprint (base64url) of the client certificate of the
        request's mTLS connection, or None; without it, no token is certificate-bound.
        """
        self._exchange = exchange
        self._record = record
        self._commit = commit
        self._liveness = liveness
        self._keys = keys
        self._max_body = max_body_bytes
        self._clients = clients
        self._client_credentials = client_credentials
        self._dpop = dpop
        self._peer_thumbprint = peer_thumbprint
        self._bind_certificates = bind_certificates
        issuer = exchange.issuer
        self._token_url = f"{issuer}/oauth2/token"
        self._metadata = orjson.dumps(
            {
                "issuer": issuer,
                "token_endpoint": self._token_url,
                # No grant uses it (RFC 8414 would allow leaving it out), but OAuth clients such as the
                # `mcp` SDK require the field: it names an endpoint that refuses every request.
                "authorization_endpoint": f"{issuer}/oauth2/authorize",
                "jwks_uri": f"{issuer}/.well-known/jwks.json",
                "grant_types_supported": list(GRANT_TYPES),
                "response_types_supported": [],
                # `none`: token exchange and the JWT bearer grant also serve public clients.
                "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
                "token_endpoint_auth_signing_alg_values_supported": list(ASYMMETRIC),
                "dpop_signing_alg_values_supported": list(dpop.algorithms),
                "scopes_supported": [],
                **(metadata or {}),
            }
        )

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/oauth2/token": {"POST": self.token},
            "/oauth2/authorize": {"GET": self.authorize, "POST": self.authorize},
            "/.well-known/jwks.json": {"GET": self.jwks},
            "/.well-known/oauth-authorization-server": {"GET": self.metadata},
        }

    async def token(self, request: Request, send: Send) -> None:
        params: dict[str, list[str]] = {}
        try:
            params = await self._form(request)
            grant_type = _one(params, "grant_type", required=True)
            client = await self._clients.authenticate(request.header(b"authorization"), params)
            if grant_type not in GRANT_TYPES:
                supported = ", ".join(f"`{g}`" for g in GRANT_TYPES)
                raise UnsupportedGrantType(
                    f"grant type `{(grant_type or '')[:80]}` is not supported; supported: {supported}"
                )
            binding = await self._binding(request)
            issued = await self._grant(grant_type, params, client, binding)
            await check_alive(self._liveness, issued.caller, "the presented credential", InvalidGrant)
        except OAuthError as error:
            self._audit_quietly(exchange_record(request.id, status=error.status, error=error.error))
            await self._send_error(send, error, request.id, params, self._dpop.nonce())
            return
        minted = issued.minted
        if self._record is not None or self._commit is not None:
            record = exchange_record(
                request.id, status=200, caller=issued.caller, claims=minted.claims, decisions=issued.decisions
            )
            try:
                # INVARIANT: no token leaves unrecorded: its record is committed (not just queued) before
                # it is sent, and a trail that cannot record refuses (DESIGN.md, invariant 6).
                if self._commit is not None:
                    await self._commit(record)
                elif self._record is not None:
                    self._record(record)
            except ServiceUnavailable:
                unavailable = TemporarilyUnavailable("the audit trail cannot record right now; no token was issued")
                await self._send_error(send, unavailable, request.id, params, None)
                return
        cnf = minted.claims.get("cnf") or {}
        body: dict[str, Any] = {
            "access_token": minted.token,
            "issued_token_type": issued.issued_token_type,
            "token_type": "DPoP" if "jkt" in cnf else "Bearer",
            "expires_in": minted.expires_in,
        }
        if issued.scope is not None:
            body["scope"] = " ".join(issued.scope)
        log.info(
            "token issued (%s): sub %s actors %s aud %s jti %s (request %s)",
            grant_type,
            minted.claims["sub"],
            [a.id for a in issued.caller.actors],
            minted.claims["aud"],
            minted.claims["jti"],
            request.id,
        )
        extra = list(NO_STORE)
        nonce = self._dpop.nonce() if self._dpop.require_nonce else None
        if nonce is not None:
            extra.append((b"dpop-nonce", nonce.encode()))
        await send_bytes(send, 200, orjson.dumps(body), request.id, extra=extra)

    async def _grant(
        self, grant_type: str | None, params: dict[str, list[str]], client: Client | None, binding: Binding
    ) -> Issued:
        if grant_type == TOKEN_EXCHANGE:
            return await self._exchange.exchange(dataclasses.replace(_exchange_request(params), binding=binding))
        scope = _one(params, "scope")
        scopes = parse_scope(scope) if scope is not None else None
        resources = tuple(self._client_credentials.audience(r) for r in params.get("resource", ()))
        audiences = tuple(params.get("audience", ()))
        if grant_type == JWT_BEARER:
            assertion = _one(params, "assertion", required=True)
            assert assertion is not None
            grant = ExchangeRequest(
                subject_token=assertion,
                subject_token_type=JWT,
                scope=scopes,
                audiences=tuple(dict.fromkeys((*resources, *audiences))),
                binding=binding,
            )
            issued = await self._exchange.exchange(grant)
            if client is not None and issued.caller.subject.id != client.id:
                # Acting for someone else is delegation: it must show in the token (`act`).
                raise UnauthorizedClient(
                    "a client may use the JWT bearer grant only for itself; to act for another subject, "
                    "use token exchange with your own token as `actor_token`"
                )
            return issued
        if client is None:
            raise InvalidClient(
                "the `client_credentials` grant needs client authentication: a `client_assertion` "
                "(`private_key_jwt` or a JWT-SVID)"
            )
        return self._client_credentials.issue(
            client, scope=scopes, resources=resources, audiences=audiences, binding=binding
        )

    async def _binding(self, request: Request) -> Binding:
        """The DPoP key and client certificate this token request proves possession of."""
        jkt = None
        try:
            proof = single_proof(request)
            if proof is not None:
                jkt = (await self._dpop.verify(proof, method="POST", url=self._token_url)).jkt
        except ProofError as error:
            if error.error == "use_dpop_nonce":
                raise UseDPoPNonce(error.message) from None
            raise InvalidDPoPProof(error.message) from None
        except ServiceUnavailable:
            raise TemporarilyUnavailable("the DPoP proof cannot be checked right now") from None
        try:
            x5t = self._peer_thumbprint(request) if self._peer_thumbprint is not None else None
        except AuthenticationError as refused:
            raise InvalidClient(f"the client certificate is refused: {refused.message}") from None
        return Binding(jkt=jkt, x5t=x5t, bind_certificate=self._bind_certificates)

    async def authorize(self, request: Request, send: Send) -> None:
        """RFC 6749 §4.1.2.1: no redirect URI is registered, so the error is shown here, never redirected."""
        body = {
            "error": "unsupported_response_type",
            "error_description": "this authorization server has no interactive flow; "
            "use token exchange, the JWT bearer grant or client credentials at `/oauth2/token`",
        }
        await send_bytes(send, 400, orjson.dumps(body), request.id, extra=NO_STORE)

    def _audit_quietly(self, record: dict[str, Any]) -> None:
        if self._record is not None:
            with contextlib.suppress(ServiceUnavailable):
                self._record(record)

    async def jwks(self, request: Request, send: Send) -> None:
        extra = ((b"cache-control", b"public, max-age=60"),)
        await send_bytes(send, 200, orjson.dumps(self._keys.jwks()), request.id, b"application/jwk-set+json", extra)

    async def metadata(self, request: Request, send: Send) -> None:
        extra = ((b"cache-control", b"public, max-age=300"),)
        await send_bytes(send, 200, self._metadata, request.id, extra=extra)

    async def _form(self, request: Request) -> dict[str, list[str]]:
        content_type = (request.header(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != FORM:
            raise InvalidRequest("send the token request as `application/x-www-form-urlencoded`")
        try:
            body = await request.body(self._max_body)
        except PayloadTooLarge:
            raise InvalidRequest(f"the token request is over the limit of {self._max_body} bytes") from None
        except BadRequest:
            raise InvalidRequest("the token request body could not be read") from None
        return _parse_form(body)

    @staticmethod
    async def _send_error(
        send: Send, error: OAuthError, request_id: str, params: dict[str, list[str]], nonce: str | None
    ) -> None:
        payload = error.payload()
        description = payload["error_description"]
        # INVARIANT: no token or secret of the request is ever echoed, whatever a message quotes.
        # A secret is recognised by its first 24 characters, so a quoted, truncated one is caught too.
        secrets = [v for name in _SECRET_PARAMS for v in params.get(name, ()) if len(v) >= 8]
        if any(secret[:24] in description for secret in secrets):
            payload["error_description"] = "the request was refused"
        extra: list[tuple[bytes, bytes]] = list(NO_STORE)
        if isinstance(error, InvalidClient):
            # RFC 6749 §5.2: a 401 carries a challenge (of the scheme the client tried, which was Basic if any).
            extra.append((b"www-authenticate", b'Basic realm="idgate"'))
        if isinstance(error, UseDPoPNonce) and nonce is not None:
            extra.append((b"dpop-nonce", nonce.encode()))
        log.info("token request refused: %s (request %s)", error.error, request_id)
        await send_bytes(send, error.status, orjson.dumps(payload), request_id, extra=extra)
