"""The HTTP side of a credential's life after it was issued: tasks, revocation, session ends.

- `POST /tasks`, `GET /tasks/{id}`, `POST /tasks/{id}/complete`: start, read and
  end a task (`idgate.sts.tasks`); JSON, the caller authenticated by the `Gate`.
- `POST /oauth2/revoke` (RFC 7009): revoke a token and everything exchanged from
  it. Holding the token is the proof (it is verified like any credential); an
  invalid, expired or unknown token is answered 200 all the same (§2.2).
- `POST /oauth2/introspect` (RFC 7662): for resource servers listed in
  `introspection` (by their own bearer token): `{"active": true, ...claims}` for a
  live gateway token, `{"active": false}` for anything else.
- `POST /oauth2/backchannel-logout` (OpenID Connect Back-Channel Logout 1.0):
  a logout token from an issuer named in `backchannel_logout.issuers` ends the
  session (`sid`), or every token of the subject (`sub`) issued until now; by
  `sub` only where that issuer's principal ids are the `sub` (`claims.subject`).
- `POST /ssf/events` (RFC 8935 push of a Security Event Token, RFC 8417): a
  CAEP `session-revoked` event from a transmitter in `ssf.transmitters` does the
  same, for the subjects and sessions of the issuers that transmitter speaks for
  (`issuers`), each identified as that issuer identifies its principals. 202 on
  success; 400 `{"err", "description"}` (RFC 8935 §2.3) otherwise. An event
  signed by an unknown key changes nothing.
- `POST /admin/revoke`: the kill switch, for administrators (`admin`): a hold on
  a subject, an agent or a tenant (every token naming it is refused, and none is
  issued, until `"lift": true` lifts it), one token (`jti`), a task, or a session.

Every change leaves an `action` audit record (`task_started`, `task_completed`,
`revocation`), never a token. A revocation is applied even when the trail cannot
record it (failing closed means revoking), and that failure is logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
from joserfc import jws
from joserfc.errors import JoseError

from idgate.audit.records import action_record
from idgate.errors import (
    AuthenticationError,
    BadRequest,
    ConfigError,
    Forbidden,
    IdgateError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    shown,
)
from idgate.identity.allowed import Allowed, issuer_names
from idgate.identity.authenticator import Authenticator
from idgate.identity.gate import Gate
from idgate.identity.issuers import OidcIssuer, TokenIssuer
from idgate.identity.keys import KeySet, file_loader, http_loader
from idgate.identity.principal import Caller
from idgate.proxy.http import Request, Send, send_bytes, send_error
from idgate.store import open_state_store
from idgate.store.base import REVOCATION_KINDS, RevocationKind, StoreUnavailable, Task
from idgate.sts.errors import InvalidRequest, OAuthError, TemporarilyUnavailable
from idgate.sts.exchange import parse_scope
from idgate.sts.lifecycle_settings import BackchannelLogoutSettings, IntrospectionSettings, SsfSettings
from idgate.sts.revocation import ANY_ISSUER, GATEWAY_ISSUER_NAME, HOLD_KINDS, Liveness
from idgate.sts.tasks import Tasks, caller_label, owner_actors

if TYPE_CHECKING:
    from idgate.config import Config

__all__ = ["BACKCHANNEL_LOGOUT_EVENT", "SESSION_REVOKED_EVENT", "Lifecycle", "build_lifecycle"]

log = logging.getLogger("idgate.sts")

Handler = Callable[[Request, Send], Awaitable[None]]
Record = Callable[[dict[str, Any]], None]

BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
SESSION_REVOKED_EVENT = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
FORM = b"application/x-www-form-urlencoded"
SECEVENT = b"application/secevent+jwt"
NO_STORE = ((b"cache-control", b"no-store"), (b"pragma", b"no-cache"))
MAX_FORM_BYTES = 64 * 1024
MAX_JSON_BYTES = 16 * 1024
MAX_VALUE = 256  # longest id, subject, tenant, reason, purpose accepted
# JWS header parameters a signed event may not carry: a key of its own, or extensions we would have to understand.
_REFUSED_HEADERS = ("jwk", "jku", "x5u", "x5c", "crit")
_ADMIN_KINDS = ("subject", "agent", "tenant", "token", "task", "session")


# -- small parsers -------------------------------------------------------------------------------


async def _form(request: Request) -> dict[str, str]:
    """A form body (RFC 6749 §3.2 style): one value per name, bounded."""
    content_type = (request.header(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type != FORM:
        raise InvalidRequest("send the request as `application/x-www-form-urlencoded`")
    try:
        body = await request.body(MAX_FORM_BYTES)
    except PayloadTooLarge:
        raise InvalidRequest(f"the request is over the limit of {MAX_FORM_BYTES} bytes") from None
    except BadRequest:
        raise InvalidRequest("the request body could not be read") from None
    try:
        pairs = parse_qsl(body.decode("utf-8"), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the request body is not a valid UTF-8 form") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise InvalidRequest(f"parameter `{shown(name, 40)}` is given more than once")
        params[name] = value
    return params


def _segment(token: str, index: int) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS (three `.`-separated parts)")
    try:
        raw = parts[index]
        value = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _text(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"`{name}` is required")
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_VALUE:
        raise BadRequest(f"`{name}` must be a non-empty string of at most {MAX_VALUE} characters")
    return value


def _audiences(claims: dict[str, Any]) -> list[str]:
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    return [v for v in values if isinstance(v, str)]


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class _SetError(Exception):
    """An RFC 8935 §2.3 error: `err` code and a description."""

    def __init__(self, err: str, description: str) -> None:
        super().__init__(description)
        self.err = err
        self.description = description


# -- the endpoints -------------------------------------------------------------------------------


class Lifecycle:
    """Tasks, revocation, introspection, session-end signals and the kill switch."""

    def __init__(
        self,
        *,
        gate: Gate,
        authenticator: Authenticator,
        liveness: Liveness,
        tasks: Tasks,
        issuers: Sequence[TokenIssuer],
        introspection: IntrospectionSettings,
        logout: BackchannelLogoutSettings,
        ssf: SsfSettings,
        audiences: tuple[str, ...],
        retention_seconds: float,
        clock_skew: float = 60.0,
        record: Record | None = None,
        fetch: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._gate = gate
        self._authenticator = authenticator
        self.liveness = liveness
        self.tasks = tasks
        self._introspectors = Allowed(
            introspection.allowed_subjects, introspection.allowed_groups, issuer_names(issuers), "introspection"
        )
        by_name = {i.name: i for i in issuers if isinstance(i, OidcIssuer)}
        unknown = [name for name in logout.issuers if name not in by_name]
        if unknown:
            raise ValueError(f"backchannel_logout.issuers: `{unknown[0]}` is not a configured issuer")
        self._logout_issuers = {by_name[name].issuer: by_name[name] for name in logout.issuers}
        self._logout = logout
        self._logout_audiences = frozenset(logout.audiences or audiences)
        self._ssf = ssf
        self._transmitters: dict[str, tuple[KeySet, str]] = {}
        names = issuer_names(issuers)
        # How each issuer's principals are identified: the claim their id comes from (`claims.subject`).
        self._subject_claims = {
            url: issuer.claims.subject if isinstance(issuer, OidcIssuer) else "sub"
            for issuer in issuers
            if (url := names.get(issuer.name)) is not None
        }
        # The issuers each transmitter speaks for: its events end their subjects and sessions only.
        self._spoken_for: dict[str, tuple[str, ...]] = {}
        for transmitter in ssf.transmitters:
            unknown_names = [name for name in transmitter.issuers if name not in names]
            if unknown_names:
                raise ValueError(f"ssf.transmitters[].issuers: `{unknown_names[0]}` is not a configured issuer")
            self._spoken_for[transmitter.issuer] = tuple(names[name] for name in transmitter.issuers)
        for transmitter in ssf.transmitters:
            if transmitter.jwks_file is not None:
                loader = file_loader(transmitter.jwks_file)
            else:
                assert transmitter.jwks_uri is not None and fetch is not None
                loader = http_loader(fetch, transmitter.jwks_uri, discovery=False)
            keys = KeySet(f"ssf:{transmitter.issuer}", loader, refetch_interval=30.0, cache_ttl=300.0)
            self._transmitters[transmitter.issuer] = (keys, transmitter.audience)
        self._retention = retention_seconds
        self._skew = clock_skew
        self._record = record
        self._clock = clock

    def routes(self) -> dict[str, dict[str, Handler]]:
        """The fixed paths; `/tasks/{id}` and `/tasks/{id}/complete` go to `task_item` (a prefix route)."""
        return {
            "/tasks": {"POST": self.start_task},
            "/oauth2/revoke": {"POST": self.revoke},
            "/oauth2/introspect": {"POST": self.introspect},
            "/oauth2/backchannel-logout": {"POST": self.backchannel_logout},
            "/ssf/events": {"POST": self.ssf_events},
            "/admin/revoke": {"POST": self.admin_revoke},
        }

    TASK_PREFIX = "/tasks/"

    def metadata(self, issuer: str) -> dict[str, Any]:
        """What these endpoints add to the RFC 8414 metadata."""
        return {
            "revocation_endpoint": f"{issuer}/oauth2/revoke",
            "revocation_endpoint_auth_methods_supported": ["none"],
            "introspection_endpoint": f"{issuer}/oauth2/introspect",
            "introspection_endpoint_auth_methods_supported": ["bearer"],
            "backchannel_logout_supported": bool(self._logout_issuers),
            "backchannel_logout_session_supported": bool(self._logout_issuers),
            "idgate_task_endpoint": f"{issuer}/tasks",
            "idgate_token_exchange_parameters": ["task"],
        }

    # -- tasks -----------------------------------------------------------------------------------

    async def start_task(self, request: Request, send: Send) -> None:
        try:
            caller = await self._gate.caller(request)
            body = await request.json_object(MAX_JSON_BYTES)
            unknown = sorted(set(body) - {"purpose", "scope", "lifetime_seconds"})
            if unknown:
                raise BadRequest(f"unknown field `{shown(unknown[0], 40)}`; expected purpose, scope, lifetime_seconds")
            purpose = _text(body, "purpose") or ""
            scope = self._task_scope(body.get("scope"))
            lifetime = body.get("lifetime_seconds")
            if lifetime is not None and (not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime <= 0):
                raise BadRequest("`lifetime_seconds` must be a positive whole number")
            try:
                task = await self.tasks.start(caller, purpose, scope, lifetime)
            except StoreUnavailable:
                raise ServiceUnavailable("tasks cannot be started right now: the state store is unavailable") from None
            details = {"scope": None if scope is None else " ".join(scope), "expires_at": task.expires_at}
            self._audit(action_record(request.id, None, caller, "task_started", task.id, "ok", details))
        except IdgateError as error:
            await send_error(send, error, request.id)
            return
        await send_bytes(send, 201, orjson.dumps(self._task_view(task)), request.id, extra=NO_STORE)

    @staticmethod
    def _task_scope(value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = " ".join(value)
        if not isinstance(value, str) or not value.strip() or len(value) > 4096:
            raise BadRequest("`scope` must be a space-separated string (or a list of strings) of scope values")
        try:
            return parse_scope(value.strip())
        except OAuthError as error:
            raise BadRequest(error.message) from None

    async def task_item(self, request: Request, send: Send) -> None:
        """`GET /tasks/{id}` and `POST /tasks/{id}/complete`."""
        try:
            rest = request.path[len(self.TASK_PREFIX) :]
            task_id, _, action = rest.partition("/")
            if action not in ("", "complete") or not task_id:
                raise NotFound(f"no endpoint at `{shown(request.path)}`")
            expected = "GET" if action == "" else "POST"
            if request.method != expected:
                raise MethodNotAllowed(f"`{shown(request.path)}` accepts {expected}", (expected,))
            caller = await self._gate.caller(request)
            task = await self._visible_task(task_id, caller)
            if action == "complete":
                was_active = task.completed_at is None
                try:
                    task = await self.tasks.complete(task, caller)
                except StoreUnavailable:
                    raise ServiceUnavailable(
                        "the task cannot be completed right now: the state store is unavailable"
                    ) from None
                if was_active:
                    self._audit(action_record(request.id, None, caller, "task_completed", task.id, "ok"))
        except IdgateError as error:
            await send_error(send, error, request.id)
            return
        await send_bytes(send, 200, orjson.dumps(self._task_view(task)), request.id, extra=NO_STORE)

    async def _visible_task(self, task_id: str, caller: Caller) -> Task:
        if len(task_id) > MAX_VALUE:
            raise NotFound("no such task")
        try:
            task = await self.tasks.get(task_id)
        except StoreUnavailable:
            raise ServiceUnavailable("tasks cannot be read right now: the state store is unavailable") from None
        # Someone else's task is answered like a missing one: its existence is not told.
        if task is None or not self.tasks.may_manage(caller, task):
            raise NotFound(f"no task `{shown(task_id)}` that this caller may see")
        return task

    def _task_view(self, task: Task) -> dict[str, Any]:
        return {
            "id": task.id,
            "status": self.tasks.status(task),
            "purpose": task.purpose,
            "scope": None if task.scope is None else " ".join(task.scope),
            "subject": {"id": task.subject, "issuer": task.subject_issuer},
            "actors": [actor for _, actor in owner_actors(task)],
            "tenant": task.tenant,
            "created_at": task.created_at,
            "expires_at": task.expires_at,
            "completed_at": task.completed_at,
            "completed_by": task.completed_by,
        }

    # -- RFC 7009 revocation ---------------------------------------------------------------------

    async def revoke(self, request: Request, send: Send) -> None:
        try:
            params = await _form(request)
            token = params.get("token")
            if not token:
                raise InvalidRequest("parameter `token` is missing")
            # `token_type_hint` is only a hint (§2.1): every kind of token is looked up the same way.
            try:
                caller = await self._authenticator.authenticate(b"Bearer " + token.encode())
            except AuthenticationError:
                caller = None  # invalid, expired or unknown: nothing to revoke, and 200 all the same (§2.2)
            except ServiceUnavailable:
                raise TemporarilyUnavailable("the token cannot be checked right now; try again") from None
            if caller is not None:
                credential = caller.credential
                until = max(credential.expires_at, self._clock()) + self._skew + 60
                try:
                    await self.liveness.revoke(
                        "token", credential.id, until=until, reason="revoked by its holder (RFC 7009)", by="holder"
                    )
                except StoreUnavailable:
                    raise TemporarilyUnavailable("the token cannot be revoked right now; try again") from None
                details = {"kind": "token", "reason": "revoked by its holder", "via": "oauth2/revoke"}
                self._audit(action_record(request.id, None, caller, "revocation", credential.id, "ok", details))
        except OAuthError as error:
            await self._oauth_error(send, error, request.id)
            return
        await send_bytes(send, 200, b"{}", request.id, extra=NO_STORE)

    # -- RFC 7662 introspection ------------------------------------------------------------------

    async def introspect(self, request: Request, send: Send) -> None:
        try:
            asker = await self._gate.caller(request)
        except AuthenticationError as error:
            await self._bearer_error(send, 401, "invalid_token", error.message, request.id)
            return
        except IdgateError as error:
            await self._oauth_error(send, TemporarilyUnavailable(error.message), request.id)
            return
        if not self._introspectors.admits(asker.subject):
            message = "this caller may not introspect tokens (config `introspection`)"
            await self._bearer_error(send, 403, "insufficient_scope", message, request.id)
            return
        try:
            params = await _form(request)
            token = params.get("token")
            if not token:
                raise InvalidRequest("parameter `token` is missing")
            answer = await self._introspection(token)
        except OAuthError as error:
            await self._oauth_error(send, error, request.id)
            return
        await send_bytes(send, 200, orjson.dumps(answer), request.id, extra=NO_STORE)

    async def _introspection(self, token: str) -> dict[str, Any]:
        try:
            caller = await self._authenticator.authenticate(b"Bearer " + token.encode())
        except AuthenticationError:
            return {"active": False}
        except ServiceUnavailable:
            raise TemporarilyUnavailable("the token cannot be checked right now; try again") from None
        # Only the gateway's own tokens are described here; anything else is not one of ours.
        if caller.credential.issuer_name != GATEWAY_ISSUER_NAME:
            return {"active": False}
        try:
            await self.liveness.verify(caller)
        except AuthenticationError:
            return {"active": False}  # revoked, its task or session ended
        except ServiceUnavailable:
            raise TemporarilyUnavailable("the revocation state cannot be checked right now; try again") from None
        claims = _segment(token, 1)  # verified above: the payload is the signed one
        answer: dict[str, Any] = {"active": True, "token_type": "Bearer"}
        if caller.credential.binding == "dpop":
            answer["token_type"] = "DPoP"  # noqa: S105 - a token type, not a secret
        for name in ("scope", "sub", "aud", "iss", "exp", "iat", "nbf", "jti", "act", "cnf", "task", "sid"):
            if name in claims:
                answer[name] = claims[name]
        answer["tenant"] = caller.subject.tenant
        answer["kind"] = caller.subject.kind
        answer["sub_id"] = claims.get("sub_id")
        return answer

    # -- OpenID Connect Back-Channel Logout 1.0 --------------------------------------------------

    async def backchannel_logout(self, request: Request, send: Send) -> None:
        try:
            if not self._logout_issuers:
                raise InvalidRequest("back-channel logout is not configured here (`backchannel_logout.issuers`)")
            params = await _form(request)
            token = params.get("logout_token")
            if not token:
                raise InvalidRequest("parameter `logout_token` is missing")
            issuer, claims = await self._logout_claims(token)
            sid, sub = claims.get("sid"), claims.get("sub")
            now = self._clock()
            jti_until = now + self._logout.max_age_seconds + 2 * self._skew
            try:
                fresh = await self._once("logout", f"{issuer.issuer} {claims['jti']}", jti_until)
                if not fresh:
                    raise InvalidRequest("this logout token was already used (`jti` replayed)")
                until = now + self._retention
                if isinstance(sid, str):
                    entry = await self.liveness.revoke(
                        "session", sid, issuer=issuer.issuer, until=until, reason="back-channel logout", by=issuer.name
                    )
                else:
                    assert isinstance(sub, str)
                    if issuer.claims.subject != "sub":
                        # Its principals' ids come from another claim: a `sub` names none of them.
                        raise InvalidRequest(
                            f"issuer `{issuer.name}` identifies subjects by `{issuer.claims.subject}`, not `sub`: "
                            "a logout token for it must name the session (`sid`)"
                        )
                    entry = await self.liveness.revoke(
                        "subject", sub, issuer=issuer.issuer, until=until, reason="back-channel logout", by=issuer.name
                    )
            except StoreUnavailable:
                raise TemporarilyUnavailable("the logout cannot be recorded right now; try again") from None
            details = {"kind": entry.kind, "issuer": issuer.issuer, "seq": entry.seq, "via": "backchannel-logout"}
            self._audit(action_record(request.id, None, None, "revocation", entry.value, "ok", details))
        except OAuthError as error:
            await self._oauth_error(send, error, request.id)
            return
        await send_bytes(send, 200, b"{}", request.id, extra=NO_STORE)

    async def _logout_claims(self, token: str) -> tuple[OidcIssuer, dict[str, Any]]:
        """The claims of a valid logout token (OIDC Back-Channel Logout 1.0 §2.6), and its issuer."""
        try:
            header, claims = _segment(token, 0), _segment(token, 1)
        except ValueError as exc:
            raise InvalidRequest(f"`logout_token` is {exc}") from None
        iss = claims.get("iss")
        issuer = self._logout_issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidRequest("`logout_token` is not from an issuer this gateway takes logouts from")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in issuer.algorithms or alg.startswith("HS"):
            raise InvalidRequest("`logout_token` algorithm is not accepted")
        if any(h in header for h in _REFUSED_HEADERS):
            raise InvalidRequest("`logout_token` header carries parameters this gateway does not accept")
        if header.get("typ") not in (None, "JWT", "logout+jwt"):
            raise InvalidRequest("`logout_token` `typ` must be `logout+jwt`")
        try:
            _, key = await issuer.key(alg, kid if isinstance(kid, str) else None)
            jws.deserialize_compact(token, key, algorithms=[alg])
        except (AuthenticationError, JoseError, ValueError, TypeError):
            raise InvalidRequest("`logout_token` signature is not valid") from None
        except ServiceUnavailable:
            raise TemporarilyUnavailable("the issuer's keys cannot be fetched right now; try again") from None
        if self._logout_audiences.isdisjoint(_audiences(claims)):
            raise InvalidRequest("`logout_token` is not for this gateway (`aud`)")
        self._check_times(claims, self._logout.max_age_seconds, "logout_token", InvalidRequest)
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_LOGOUT_EVENT), dict):
            raise InvalidRequest(f"`logout_token` `events` has no `{BACKCHANNEL_LOGOUT_EVENT}` member")
        if "nonce" in claims:
            raise InvalidRequest("`logout_token` must not carry a `nonce`")
        sid, sub = claims.get("sid"), claims.get("sub")
        if not (isinstance(sid, str) and sid) and not (isinstance(sub, str) and sub):
            raise InvalidRequest("`logout_token` names neither `sid` nor `sub`")
        for name, value in (("sid", sid), ("sub", sub)):
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_VALUE):
                raise InvalidRequest(f"`logout_token` `{name}` must be a non-empty string")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_VALUE:
            raise InvalidRequest("`logout_token` has no `jti`")
        return issuer, claims

    def _check_times(self, claims: dict[str, Any], max_age: float, what: str, error: type[Exception]) -> None:
        now = self._clock()
        iat = _number(claims, "iat")
        if iat is None:
            raise error(f"`{what}` has no `iat`")
        if iat > now + self._skew or iat < now - max_age - self._skew:
            raise error(f"`{what}` `iat` is not recent")
        exp = _number(claims, "exp")
        if "exp" in claims and (exp is None or now > exp + self._skew):
            raise error(f"`{what}` has expired")

    async def _once(self, namespace: str, key: str, until: float) -> bool:
        return await asyncio.to_thread(self.liveness.store.once, namespace, key, until)

    # -- RFC 8935: CAEP events pushed by a transmitter -------------------------------------------

    async def ssf_events(self, request: Request, send: Send) -> None:
        try:
            content_type = (request.header(b"content-type") or b"").split(b";")[0].strip().lower()
            if content_type != SECEVENT:
                raise _SetError("invalid_request", "send the event as `application/secevent+jwt`")
            try:
                body = await request.body(MAX_FORM_BYTES)
            except (PayloadTooLarge, BadRequest):
                raise _SetError("invalid_request", f"the event is unreadable or over {MAX_FORM_BYTES} bytes") from None
            try:
                token = body.decode("ascii").strip()
            except UnicodeDecodeError:
                raise _SetError("invalid_request", "the event is not a compact JWS") from None
            issuer, claims = await self._set_claims(token)
            await self._act_on_set(request.id, issuer, claims)
        except _SetError as error:
            log.info("SSF event refused: %s (request %s)", error.err, request.id)
            payload = {"err": error.err, "description": error.description}
            await send_bytes(send, 400, orjson.dumps(payload), request.id, extra=NO_STORE)
            return
        except TemporarilyUnavailable as error:
            await send_bytes(send, 503, orjson.dumps({"err": "unavailable", "description": error.message}), request.id)
            return
        await send_bytes(send, 202, b"", request.id, extra=NO_STORE)

    async def _set_claims(self, token: str) -> tuple[str, dict[str, Any]]:
        try:
            header, claims = _segment(token, 0), _segment(token, 1)
        except ValueError as exc:
            raise _SetError("invalid_request", f"the event is {exc}") from None
        iss = claims.get("iss")
        found = self._transmitters.get(iss) if isinstance(iss, str) else None
        if found is None:
            raise _SetError("invalid_issuer", "the event's issuer is not a configured transmitter")
        keys, audience = found
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg.lower() == "none" or alg.startswith("HS"):
            raise _SetError("invalid_key", "the event must be signed with an asymmetric algorithm")
        if any(h in header for h in _REFUSED_HEADERS):
            raise _SetError("invalid_request", "the event header carries parameters this receiver does not accept")
        if header.get("typ") not in (None, "secevent+jwt", "application/secevent+jwt"):
            raise _SetError("invalid_request", "the event `typ` must be `secevent+jwt`")
        try:
            _, key = await keys.resolve(kid if isinstance(kid, str) else None)
            jws.deserialize_compact(token, key, algorithms=[alg])
        except ServiceUnavailable:
            raise TemporarilyUnavailable("the transmitter's keys cannot be fetched right now") from None
        except (AuthenticationError, JoseError, ValueError, TypeError):
            raise _SetError("invalid_key", "the event is not signed by a key of its transmitter") from None
        if audience not in _audiences(claims):
            raise _SetError("invalid_audience", "the event is not for this receiver (`aud`)")

        def refused(message: str) -> _SetError:
            return _SetError("invalid_request", message)

        try:
            self._check_times(claims, self._ssf.max_age_seconds, "event", ValueError)
        except ValueError as exc:
            raise refused(str(exc)) from None
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_VALUE:
            raise refused("the event has no `jti`")
        if not isinstance(claims.get("events"), dict) or not claims["events"]:
            raise refused("the event has no `events`")
        return iss, claims  # type: ignore[return-value]

    async def _act_on_set(self, request_id: str, issuer: str, claims: dict[str, Any]) -> None:
        events: dict[str, Any] = claims["events"]
        event = events.get(SESSION_REVOKED_EVENT)
        if event is None:
            return  # another event type: accepted (§2.2), nothing to do here
        if not isinstance(event, dict):
            raise _SetError("invalid_request", "the `session-revoked` event must be an object")
        subject = event.get("subject", claims.get("sub_id"))
        targets = self._caep_targets(subject, self._spoken_for.get(issuer, ()))
        now = self._clock()
        try:
            jti_until = now + self._ssf.max_age_seconds + 2 * self._skew
            if not await self._once("ssf", f"{issuer} {claims['jti']}", jti_until):
                return  # a duplicate delivery: already acted on
            entries = [
                await self.liveness.revoke(
                    kind,
                    value,
                    issuer=subject_issuer,
                    until=now + self._retention,
                    reason="CAEP session-revoked",
                    by=issuer,
                )
                for kind, value, subject_issuer in targets
            ]
        except StoreUnavailable:
            raise TemporarilyUnavailable("the event cannot be recorded right now; try again") from None
        for entry in entries:
            details = {
                "kind": entry.kind,
                "issuer": entry.issuer,
                "seq": entry.seq,
                "via": "ssf",
                "transmitter": issuer,
            }
            self._audit(action_record(request_id, None, None, "revocation", entry.value, "ok", details))

    def _caep_targets(self, subject: Any, issuers: tuple[str, ...]) -> list[tuple[RevocationKind, str, str]]:
        """What a CAEP subject identifier (RFC 9493, SSF `complex`) revokes: a session, or a subject's tokens,
        at the issuers the transmitter speaks for (`issuers`) and as each identifies its subjects:
        `iss_sub` at that issuer if it is one of them and its ids are the `sub`; `email` at those whose ids
        are the `email` claim (compared without regard to case); `opaque` the id at each of them."""

        def refused(message: str) -> _SetError:
            return _SetError("invalid_request", message)

        def text(value: Any, what: str) -> str:
            if not isinstance(value, str) or not value or len(value) > MAX_VALUE:
                raise refused(f"the event subject's `{what}` must be a non-empty string")
            return value

        def spoken_for(iss: str) -> str:
            if iss not in issuers:
                raise refused("the event names an issuer this transmitter does not speak for")
            return iss

        def by_claim(claim: str, value: str) -> list[tuple[RevocationKind, str, str]]:
            found = [url for url in issuers if self._subject_claims.get(url) == claim]
            if not found:
                raise refused(f"no issuer of this transmitter identifies its subjects by `{claim}`")
            return [("subject", value, url) for url in found]

        if not isinstance(subject, dict):
            raise refused("the `session-revoked` event names no subject (`subject` or `sub_id`)")
        form = subject.get("format")
        if form == "complex":
            session = subject.get("session")
            user = subject.get("user")
            if isinstance(session, dict) and session.get("format") == "opaque":
                sid = text(session.get("id"), "session.id")
                if isinstance(user, dict) and user.get("format") == "iss_sub":
                    return [("session", sid, spoken_for(text(user.get("iss"), "user.iss")))]
                return [("session", sid, url) for url in issuers]
            if isinstance(user, dict):
                return self._caep_targets(user, issuers)
            raise refused("a `complex` subject needs `session` (opaque) or `user`")
        if form == "iss_sub":
            iss = spoken_for(text(subject.get("iss"), "iss"))
            if self._subject_claims.get(iss) != "sub":
                raise refused("that issuer identifies its subjects by another claim than `sub`: send that identifier")
            return [("subject", text(subject.get("sub"), "sub"), iss)]
        if form == "email":
            return by_claim("email", text(subject.get("email"), "email"))
        if form == "opaque":
            value = text(subject.get("id"), "id")
            return [("subject", value, url) for url in issuers]
        raise refused(f"subject format `{shown(form, 40)}` is not supported (iss_sub, email, opaque, complex)")

    # -- the kill switch -------------------------------------------------------------------------

    async def admin_revoke(self, request: Request, send: Send) -> None:
        try:
            caller = await self._gate.caller(request)
            if not self.tasks.is_admin(caller):
                raise Forbidden("only administrators may revoke (config `admin`)")
            body = await request.json_object(MAX_JSON_BYTES)
            kinds = [k for k in _ADMIN_KINDS if k in body]
            unknown = sorted(set(body) - {*_ADMIN_KINDS, "reason", "issuer", "lift"})
            if unknown or len(kinds) != 1:
                raise BadRequest(
                    f"give exactly one of {', '.join(_ADMIN_KINDS)}, and a `reason` (`issuer` and `lift` optional)"
                )
            kind = kinds[0]
            assert kind in REVOCATION_KINDS
            value = _text(body, kind, required=True)
            reason = _text(body, "reason", required=True)
            issuer = _text(body, "issuer")
            assert value is not None and reason is not None
            if issuer is not None and kind not in ("subject", "session"):
                raise BadRequest("`issuer` qualifies only a `subject` or a `session`")
            lift = body.get("lift", False)
            if not isinstance(lift, bool):
                raise BadRequest("`lift` must be true or false")
            if lift and kind not in HOLD_KINDS:
                raise BadRequest("`lift` ends the kill switch on a `subject`, an `agent` or a `tenant` only")
            if lift:
                answer = await self._admin_lift(request.id, caller, kind, value, issuer, reason)
            else:
                answer = await self._admin_revoke(request.id, caller, kind, value, issuer, reason)
        except IdgateError as error:
            await send_error(send, error, request.id)
            return
        await send_bytes(send, 200, orjson.dumps(answer), request.id, extra=NO_STORE)

    async def _admin_revoke(
        self, request_id: str, caller: Caller, kind: str, value: str, issuer: str | None, reason: str
    ) -> dict[str, Any]:
        by = caller_label(caller)
        now = self._clock()
        try:
            if kind == "task":
                task = await self.tasks.get(value)
                if task is None:
                    raise NotFound(f"no task `{shown(value)}`")
                task = await self.tasks.complete(task, caller)
                self._audit(action_record(request_id, None, caller, "task_completed", value, "ok", {"reason": reason}))
                return {"revoked": {"kind": "task", "value": value, "status": self.tasks.status(task)}}
            scoped = (issuer or ANY_ISSUER) if kind in ("subject", "session") else None
            held = kind in HOLD_KINDS
            if held:  # a hold: until lifted, whatever a token's `iat`, and no new token either
                entry = await self.liveness.hold(kind, value, issuer=scoped, reason=reason, by=by)  # type: ignore[arg-type]
            else:
                entry = await self.liveness.revoke(
                    kind,  # type: ignore[arg-type]
                    value,
                    issuer=scoped,
                    until=now + self._retention,
                    reason=reason,
                    by=by,
                )
        except StoreUnavailable:
            raise ServiceUnavailable("nothing was revoked: the state store is unavailable; try again") from None
        details = {"kind": kind, "issuer": scoped, "seq": entry.seq, "reason": reason, "via": "admin", "hold": held}
        self._audit(action_record(request_id, None, caller, "revocation", value, "ok", details))
        log.warning("kill switch: %s `%s` revoked by %s: %s", kind, shown(value), by, shown(reason))
        revoked = {"kind": kind, "value": value, "issuer": scoped, "seq": entry.seq, "at": entry.at, "held": held}
        return {"revoked": revoked}

    async def _admin_lift(
        self, request_id: str, caller: Caller, kind: str, value: str, issuer: str | None, reason: str
    ) -> dict[str, Any]:
        """End a kill-switch hold; recorded like the hold itself."""
        by = caller_label(caller)
        scoped = (issuer or ANY_ISSUER) if kind == "subject" else None
        was_held = self.liveness.holds(kind, value, scoped)
        try:
            entry = await self.liveness.lift(kind, value, issuer=scoped, reason=reason, by=by)  # type: ignore[arg-type]
        except StoreUnavailable:
            raise ServiceUnavailable("nothing was lifted: the state store is unavailable; try again") from None
        details = {"kind": kind, "issuer": scoped, "seq": entry.seq, "reason": reason, "via": "admin", "lift": True}
        self._audit(action_record(request_id, None, caller, "revocation", value, "lifted", details))
        log.warning("kill switch: %s `%s` lifted by %s: %s", kind, shown(value), by, shown(reason))
        lifted = {"kind": kind, "value": value, "issuer": scoped, "seq": entry.seq, "at": entry.at}
        return {"lifted": {**lifted, "was_held": was_held}}

    # -- helpers ---------------------------------------------------------------------------------

    def _audit(self, record: dict[str, Any]) -> None:
        if self._record is None:
            return
        try:
            self._record(record)
        except ServiceUnavailable:
            log.error("audit trail unavailable: a %s (%s) was not recorded", record.get("action"), record.get("target"))

    @staticmethod
    async def _oauth_error(send: Send, error: OAuthError, request_id: str) -> None:
        log.info("refused: %s (request %s)", error.error, request_id)
        await send_bytes(send, error.status, orjson.dumps(error.payload()), request_id, extra=NO_STORE)

    @staticmethod
    async def _bearer_error(send: Send, status: int, code: str, message: str, request_id: str) -> None:
        description = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in message)
        challenge = f'Bearer realm="idgate", error="{code}", error_description="{description}"'.encode()
        payload = {"error": code, "error_description": message}
        extra = (*NO_STORE, (b"www-authenticate", challenge))
        await send_bytes(send, status, orjson.dumps(payload), request_id, extra=extra)


def build_lifecycle(
    config: Config,
    *,
    gate: Gate,
    authenticator: Authenticator,
    issuers: Sequence[TokenIssuer],
    record: Record | None,
    fetch: Callable[[], aiohttp.ClientSession] | None,
) -> Lifecycle:
    """The state store, the liveness view over it, tasks, and their endpoints, from the config."""
    store = open_state_store(config)
    settings = config.liveness
    # Issuers whose subject ids are email addresses: their revocations are compared without regard to case.
    emails = frozenset(i.issuer for i in issuers if isinstance(i, OidcIssuer) and i.claims.subject == "email")
    liveness = Liveness(
        store,
        poll_interval=settings.poll_interval_seconds,
        max_staleness=settings.max_staleness_seconds,
        casefold_issuers=emails,
    )
    try:
        admins = Allowed(config.admin.subjects, config.admin.groups, issuer_names(issuers), "admin")
        tasks = Tasks(store, liveness, config.tasks, admins, retention_seconds=settings.retention_seconds)
        return Lifecycle(
            gate=gate,
            authenticator=authenticator,
            liveness=liveness,
            tasks=tasks,
            issuers=issuers,
            introspection=config.introspection,
            logout=config.backchannel_logout,
            ssf=config.ssf,
            audiences=config.server.accepted_audiences,
            retention_seconds=settings.retention_seconds,
            clock_skew=config.server.clock_skew_seconds,
            record=record,
            fetch=fetch,
        )
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
