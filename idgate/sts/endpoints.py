"""The OAuth endpoints of the token service, on the gateway's raw ASGI layer.

- `POST /oauth2/token`: token exchange (RFC 8693), form-encoded (RFC 6749 §3.2);
  answers and errors as RFC 6749 §5.1/§5.2 JSON with `Cache-Control: no-store`.
- `GET /.well-known/jwks.json`: the public signing keys, current first.
- `GET /.well-known/oauth-authorization-server`: RFC 8414 metadata.

Client authentication: none yet (RFC 8693 allows public clients; the subject
and actor tokens are the proof). A request that tries to authenticate as a
client (an `Authorization` header, `client_secret`, `client_assertion`) is
refused with 401 `invalid_client` rather than silently ignored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson

from idgate.audit.records import exchange_record
from idgate.errors import BadRequest, PayloadTooLarge, ServiceUnavailable
from idgate.proxy.http import Request, Send, send_bytes
from idgate.sts.errors import (
    InvalidClient,
    InvalidRequest,
    OAuthError,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from idgate.sts.exchange import SUBJECT_TOKEN_TYPES, ExchangeRequest, TokenExchange, parse_scope
from idgate.sts.keys import SigningKeys

__all__ = ["TOKEN_EXCHANGE", "Handler", "OAuthEndpoints"]

log = logging.getLogger("idgate.sts")

Handler = Callable[[Request, Send], Awaitable[None]]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a URN, not a secret
FORM = b"application/x-www-form-urlencoded"
NO_STORE = ((b"cache-control", b"no-store"), (b"pragma", b"no-cache"))
# RFC 8693 §2.1: `resource` and `audience` may repeat; every other parameter is given at most once.
_REPEATABLE = frozenset({"resource", "audience"})
_SECRET_PARAMS = ("subject_token", "actor_token", "client_secret", "client_assertion")


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
    )


class OAuthEndpoints:
    """The handlers; `routes()` gives them by path and method for the app's route table."""

    def __init__(
        self,
        exchange: TokenExchange,
        keys: SigningKeys,
        *,
        max_body_bytes: int,
        record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """`record`: where each exchange's audit record goes (it raises when it cannot take one)."""
        self._exchange = exchange
        self._record = record
        self._keys = keys
        self._max_body = max_body_bytes
        issuer = exchange.issuer
        self._metadata = orjson.dumps(
            {
                "issuer": issuer,
                "token_endpoint": f"{issuer}/oauth2/token",
                "jwks_uri": f"{issuer}/.well-known/jwks.json",
                "grant_types_supported": [TOKEN_EXCHANGE],
                "response_types_supported": [],
                "token_endpoint_auth_methods_supported": ["none"],
                "scopes_supported": [],
            }
        )

    def routes(self) -> dict[str, dict[str, Handler]]:
        return {
            "/oauth2/token": {"POST": self.token},
            "/.well-known/jwks.json": {"GET": self.jwks},
            "/.well-known/oauth-authorization-server": {"GET": self.metadata},
        }

    async def token(self, request: Request, send: Send) -> None:
        params: dict[str, list[str]] = {}
        try:
            params = await self._form(request)
            grant_type = _one(params, "grant_type", required=True)
            if grant_type != TOKEN_EXCHANGE:
                raise UnsupportedGrantType(
                    f"grant type `{(grant_type or '')[:80]}` is not supported; supported: `{TOKEN_EXCHANGE}`"
                )
            issued = await self._exchange.exchange(_exchange_request(params))
        except OAuthError as error:
            self._audit_quietly(exchange_record(request.id, status=error.status, error=error.error))
            await self._send_error(send, error, request.id, params)
            return
        minted = issued.minted
        if self._record is not None:
            try:
                # INVARIANT: no token leaves unrecorded; a trail that cannot record refuses.
                self._record(
                    exchange_record(
                        request.id, status=200, caller=issued.caller, claims=minted.claims, decisions=issued.decisions
                    )
                )
            except ServiceUnavailable:
                unavailable = TemporarilyUnavailable("the audit trail cannot record right now; no token was issued")
                await self._send_error(send, unavailable, request.id, params)
                return
        body: dict[str, Any] = {
            "access_token": minted.token,
            "issued_token_type": issued.issued_token_type,
            "token_type": "Bearer",
            "expires_in": minted.expires_in,
        }
        if issued.scope is not None:
            body["scope"] = " ".join(issued.scope)
        log.info(
            "token exchange: sub %s actors %s aud %s jti %s (request %s)",
            minted.claims["sub"],
            [a.id for a in issued.caller.actors],
            minted.claims["aud"],
            minted.claims["jti"],
            request.id,
        )
        await send_bytes(send, 200, orjson.dumps(body), request.id, extra=NO_STORE)

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
        params = _parse_form(body)
        if request.header(b"authorization") is not None or "client_secret" in params or "client_assertion" in params:
            raise InvalidClient("client authentication is not supported here; send no client credentials")
        return params

    @staticmethod
    async def _send_error(send: Send, error: OAuthError, request_id: str, params: dict[str, list[str]]) -> None:
        payload = error.payload()
        description = payload["error_description"]
        # INVARIANT: no token or secret of the request is ever echoed, whatever a message quotes.
        # A secret is recognised by its first 24 characters, so a quoted, truncated one is caught too.
        secrets = [v for name in _SECRET_PARAMS for v in params.get(name, ()) if len(v) >= 8]
        if any(secret[:24] in description for secret in secrets):
            payload["error_description"] = "the request was refused"
        extra: list[tuple[bytes, bytes]] = list(NO_STORE)
        if isinstance(error, InvalidClient):
            extra.append((b"www-authenticate", b'Basic realm="idgate"'))
        log.info("token request refused: %s (request %s)", error.error, request_id)
        await send_bytes(send, error.status, orjson.dumps(payload), request_id, extra=extra)
