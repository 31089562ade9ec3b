"""Token exchange (RFC 8693): a subject's token, and an actor's, for a gateway token.

The rules, each a refusal when it fails:

1. Both tokens are verified by the gateway's `Authenticator`: any trusted
   issuer, a SPIFFE JWT-SVID, or a token of the gateway itself. A bad token is
   `invalid_grant`.
2. `may_act` in the subject token, when present, names who may act for the
   subject (RFC 8693 §4.4): an actor token of anyone else is refused.
3. The audience is what was asked (`resource`, `audience`), else the default;
   a gateway token exchanged again keeps at most its own audiences.
4. The scope is what was asked, and never more than the subject token's own
   `scope` or the actor token's (when it has one): asking for more is
   `invalid_scope`. Asking for nothing grants what both tokens hold. A subject
   token without a `scope` claim (an ID token, a JWT-SVID) holds none: asking
   for any is `invalid_scope`, and the new token carries no `scope`.
5. Policy: the caller (subject and the new actor chain) must be allowed
   `exchange_token` on each audience; a deny is `invalid_target`.
6. The lifetime is the configured one, and never beyond the subject or actor
   token. Delegation never amplifies (DESIGN.md, invariant 3).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from idgate.errors import AuthenticationError, ServiceUnavailable, shown
from idgate.identity.authenticator import Authenticator
from idgate.identity.principal import Actor, Caller
from idgate.policy.decision import Authorizer, Decision, Resource
from idgate.store.base import StoreUnavailable
from idgate.sts.errors import (
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    TemporarilyUnavailable,
)
from idgate.sts.tokens import UNBOUND, Binding, Grant, MintedToken, TokenMinter

if TYPE_CHECKING:
    from idgate.store.base import Task
    from idgate.sts.revocation import Liveness
    from idgate.sts.tasks import Tasks

__all__ = [
    "ACCESS_TOKEN",
    "ID_TOKEN",
    "JWT",
    "SUBJECT_TOKEN_TYPES",
    "ExchangeRequest",
    "TokenExchange",
    "authorize_audience",
    "check_alive",
]

ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a URN, not a secret
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105 - a URN, not a secret
JWT = "urn:ietf:params:oauth:token-type:jwt"
SUBJECT_TOKEN_TYPES = (ACCESS_TOKEN, ID_TOKEN, JWT)
ISSUED_TOKEN_TYPES = (ACCESS_TOKEN, JWT)

# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
MAX_PARENTS = 16  # the most ancestors a token may have: a deeper chain of exchanges is refused, never cut
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """A token-exchange request, its form parameters already checked for presence and types."""

    subject_token: str
    subject_token_type: str
    actor_token: str | None = None
    actor_token_type: str | None = None
    scope: tuple[str, ...] | None = None
    resources: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    requested_token_type: str | None = None
    task: str | None = None  # bind the token to this task (`POST /tasks`): idgate's extra parameter
    binding: Binding = UNBOUND  # the request's DPoP key / client certificate (idgate.sts.tokens.Binding)


@dataclass(frozen=True, slots=True)
class Issued:
    minted: MintedToken
    issued_token_type: str
    scope: tuple[str, ...] | None
    caller: Caller  # who it was issued to: subject and the new actor chain
    decisions: tuple[Decision, ...]


@dataclass(frozen=True, slots=True)
class _Verified:
    caller: Caller
    claims: dict[str, Any]


def parse_scope(value: str, what: str = "scope") -> tuple[str, ...]:
    """A space-delimited scope, each value checked, duplicates dropped, order kept."""
    values = tuple(dict.fromkeys(value.split(" ")))
    for item in values:
        if not _SCOPE_TOKEN.match(item):
            raise InvalidScope(f"`{what}` value `{shown(item)}` is not a valid scope token")
    return values


def _claims(token: str) -> dict[str, Any]:
    # INVARIANT: called only after the Authenticator verified this very token's
    # signature, so the payload read here is the one that was signed.
    segment = token.split(".")[1]
    value = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


def _token_scope(claims: dict[str, Any], what: str) -> tuple[str, ...] | None:
    value = claims.get("scope")
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(dict.fromkeys(value.split()))
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(dict.fromkeys(value))
    raise InvalidGrant(f"`{what}` claim `scope` must be a space-separated string")


def _within_task(scope: tuple[str, ...] | None, task: Task, *, asked: bool) -> tuple[str, ...] | None:
    """The scope of a task-bound token: within the task's scope (asked for more: `invalid_scope`)."""
    if task.scope is None or scope is None:
        return scope  # no scope held: a task's scope is a ceiling, never a grant
    extra = [s for s in scope if s not in task.scope]
    if extra and asked:
        raise InvalidScope(f"scope `{shown(extra[0])}` is more than the task allows")
    narrowed = tuple(s for s in scope if s in task.scope)
    if not narrowed:
        raise InvalidScope("the presented tokens share no scope with the task")
    return narrowed


def _parents(subject: _Verified, actor: _Verified | None) -> tuple[str, ...]:
    """The ids of the tokens a new one comes from, and theirs: revoking any of them ends it.

    Never truncated: dropping the oldest ancestor would let a token escape the revocation of
    its root by being re-exchanged often enough, so a chain deeper than `MAX_PARENTS` is refused."""
    parents: list[str] = []
    for verified in (subject, actor):
        if verified is not None:
            credential = verified.caller.credential
            parents.extend((credential.id, *credential.parents))
    unique = tuple(dict.fromkeys(parents))
    if len(unique) > MAX_PARENTS:
        raise InvalidGrant(f"delegation chain too deep: a token may come from at most {MAX_PARENTS} tokens")
    return unique


def _token_audiences(claims: dict[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    return tuple(v for v in values if isinstance(v, str))


async def check_alive(liveness: Liveness | None, caller: Caller, what: str, refused: type[OAuthError]) -> None:
    """Refuse a credential that was revoked (or its task, session, subject, agent or tenant): `refused`,
    or `temporarily_unavailable` when the revocation state cannot be known (fail closed)."""
    if liveness is None:
        return
    try:
        await liveness.verify(caller)
    except ServiceUnavailable:
        raise TemporarilyUnavailable(f"`{what}` cannot be checked now: revocation state unavailable") from None
    except AuthenticationError as exc:
        raise refused(f"`{what}` is not valid: {exc.message}") from None


def authorize_audience(
    authorizer: Authorizer, caller: Caller, audience: str, who: str, *, wider: str | None = None
) -> Decision:
    """The policy's allow for `caller` to get a token for `audience` (`exchange_token`), or `InvalidTarget`.

    `wider`: an audience whose token holds more (the gateway as a whole, for one of its MCP
    resources): whoever may have that one may have this narrower one too."""
    try:
        decision = authorizer.authorize(caller, "exchange_token", Resource("audience", audience), {})
        if not decision.allowed and wider is not None and wider != audience:
            decision = authorizer.authorize(caller, "exchange_token", Resource("audience", wider), {})
    except Exception:  # noqa: BLE001 - fail closed: any error in policy is a deny
        raise InvalidTarget(f"no token for audience `{shown(audience)}`: the policy could not decide") from None
    if not decision.allowed:
        raise InvalidTarget(
            f"no token for audience `{shown(audience)}`: not allowed for this {who} "
            f"(reason `{decision.reason}`, decision `{decision.id}`)"
        )
    return decision


class TokenExchange:
    """Decides and mints RFC 8693 exchanges; the HTTP side is in `endpoints.py`."""

    def __init__(
        self,
        authenticator: Authenticator,
        authorizer: Authorizer,
        minter: TokenMinter,
        *,
        default_audience: str,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
        liveness: Liveness | None = None,
        tasks: Tasks | None = None,
        gateway_audiences: tuple[str, ...] = (),
    ) -> None:
        """`liveness`: refuse revoked subject/actor tokens; `tasks`: where the `task` parameter is looked up;
        `gateway_audiences`: the gateway's own accepted audiences (its MCP resources among them)."""
        self._gateway_audiences = frozenset(gateway_audiences)
        self._liveness = liveness
        self._tasks = tasks
        self._authenticator = authenticator
        self._authorizer = authorizer
        self._minter = minter
        self._default_audience = default_audience
        self._ttl = ttl_seconds
        self._clock = clock

    @property
    def issuer(self) -> str:
        return self._minter.issuer

    def _wider(self, audience: str) -> str | None:
        """The gateway's default audience, for a token asked for another of the gateway's own audiences."""
        return self._default_audience if audience in self._gateway_audiences else None

    async def exchange(self, request: ExchangeRequest) -> Issued:
        subject = await self._verify(request.subject_token, "subject_token")
        actor = await self._verify(request.actor_token, "actor_token") if request.actor_token is not None else None
        request.binding.check(subject.caller.credential, "subject_token")
        if actor is not None:
            request.binding.check(actor.caller.credential, "actor_token")
        if actor is not None and actor.claims.get("act") is not None:
            raise InvalidGrant("`actor_token` must name one actor, not carry a delegation chain (`act`)")
        self._check_may_act(subject.claims, actor)
        issued_type = self._issued_type(request.requested_token_type)
        audiences = self._audiences(request, subject)
        scope = self._scope(request.scope, subject, actor)
        bound = await self._bound_task(request.task, subject, actor)
        if bound is not None:
            scope = _within_task(scope, bound, asked=request.scope is not None)
        chain = subject.caller.actors
        if actor is not None:
            principal = actor.caller.subject
            chain = (Actor(principal.id, principal.kind, principal.issuer), *chain)
        caller = Caller(subject.caller.subject, subject.caller.credential, chain)
        decisions = tuple(
            authorize_audience(self._authorizer, caller, audience, "caller", wider=self._wider(audience))
            for audience in audiences
        )
        now = self._clock()
        expires_at = min(now + self._ttl, subject.caller.credential.expires_at)
        if actor is not None:
            expires_at = min(expires_at, actor.caller.credential.expires_at)
        if bound is not None:
            expires_at = min(expires_at, bound.expires_at)  # never outlives its task
        if int(expires_at) <= int(now):
            raise InvalidGrant("the presented token has expired")
        grant = Grant(
            subject=subject.caller.subject,
            subject_issuer=self._subject_issuer(subject),
            audiences=audiences,
            expires_at=int(expires_at),
            scope=scope,
            actors=chain,
            task=bound.id if bound is not None else self._task(subject, actor),
            session=self._session(subject),
            parents=_parents(subject, actor),
            cnf=request.binding.cnf,
        )
        return Issued(self._minter.mint(grant), issued_type, scope, caller, decisions)

    async def _verify(self, token: str, what: str) -> _Verified:
        try:
            caller = await self._authenticator.authenticate(b"Bearer " + token.encode())
        except ServiceUnavailable:
            raise TemporarilyUnavailable(f"`{what}` cannot be checked now: its issuer's keys are unavailable") from None
        except AuthenticationError as exc:
            raise InvalidGrant(f"`{what}` is not valid: {exc.message}") from None
        # A revoked token, or one of an ended task or session, cannot be exchanged.
        await check_alive(self._liveness, caller, what, InvalidGrant)
        return _Verified(caller, _claims(token))

    async def _bound_task(self, task_id: str | None, subject: _Verified, actor: _Verified | None) -> Task | None:
        """The task a `task` parameter names, if this subject may bind a token to it."""
        if task_id is None:
            return None
        if self._tasks is None:
            raise InvalidRequest("parameter `task` is not supported here")
        held = self._task(subject, actor)
        if held is not None and held != task_id:
            raise InvalidGrant("the presented tokens belong to another task")
        try:
            task = await self._tasks.get(task_id) if len(task_id) <= 256 else None
        except StoreUnavailable:
            raise TemporarilyUnavailable("the task cannot be looked up now: the state store is unavailable") from None
        # Someone else's task is refused like a missing one.
        if task is None or not self._tasks.may_bind(subject.caller, task):
            raise InvalidGrant(f"no task `{shown(task_id)}` this subject may bind a token to")
        if task.status(self._clock()) != "active":
            raise InvalidGrant(f"task `{shown(task_id)}` has ended")
        return task

    def _is_gateway_token(self, verified: _Verified) -> bool:
        # By `iss` (verified): a gateway token's subject keeps its first issuer (`sub_id`), so not by that.
        return verified.claims.get("iss") == self.issuer

    @staticmethod
    def _check_may_act(claims: dict[str, Any], actor: _Verified | None) -> None:
        may_act = claims.get("may_act")
        if may_act is None or actor is None:
            return
        if not isinstance(may_act, dict) or not isinstance(may_act.get("sub"), str):
            raise InvalidGrant("`subject_token` claim `may_act` must be an object with a `sub` string")
        who = actor.caller.subject
        issuer = may_act.get("iss")
        if may_act["sub"] != who.id or (issuer is not None and issuer != who.issuer):
            raise InvalidGrant(f"the subject token does not allow `{shown(who.id)}` to act for it (`may_act`)")

    @staticmethod
    def _issued_type(requested: str | None) -> str:
        if requested is None:
            return ACCESS_TOKEN
        if requested not in ISSUED_TOKEN_TYPES:
            supported = ", ".join(f"`{t}`" for t in ISSUED_TOKEN_TYPES)
            raise InvalidRequest(
                f"`requested_token_type` `{shown(requested)}` is not supported; supported: {supported}"
            )
        return requested

    def _audiences(self, request: ExchangeRequest, subject: _Verified) -> tuple[str, ...]:
        for resource in request.resources:
            parts = urlsplit(resource)
            if not parts.scheme or not parts.netloc or parts.fragment:
                raise InvalidTarget(f"`resource` `{shown(resource)}` must be an absolute URI without a fragment")
        asked = tuple(dict.fromkeys((*request.resources, *request.audiences)))
        if not self._is_gateway_token(subject):
            return asked or (self._default_audience,)
        held = _token_audiences(subject.claims)
        wider = [a for a in asked if a not in held]
        if wider:
            raise InvalidTarget(
                f"a gateway token can only be exchanged for its own audiences; `{shown(wider[0])}` is not one of them"
            )
        return asked or held

    @staticmethod
    def _scope(asked: tuple[str, ...] | None, subject: _Verified, actor: _Verified | None) -> tuple[str, ...] | None:
        # The subject token's `scope` is the ceiling, and a subject token without one holds no scope
        # at all (an ID token, a JWT-SVID): asking for any is `invalid_scope`, asking for none gets none.
        # An actor token's `scope`, when it has one, narrows further.
        subject_scope = _token_scope(subject.claims, "subject_token")
        if subject_scope is None:
            if asked is not None:
                raise InvalidScope(
                    f"scope `{shown(asked[0])}` is more than the `subject_token` holds (it carries no `scope`)"
                )
            return None
        limits = [(subject_scope, "subject_token")]
        if actor is not None:
            held = _token_scope(actor.claims, "actor_token")
            if held is not None:
                limits.append((held, "actor_token"))
        if asked is None:
            granted = limits[0][0]
            for held, _ in limits[1:]:
                granted = tuple(s for s in granted if s in held)
            if not granted:
                raise InvalidScope("the subject and actor tokens share no scope")
            return granted
        for held, what in limits:
            extra = [s for s in asked if s not in held]
            if extra:
                raise InvalidScope(f"scope `{shown(extra[0])}` is more than the `{what}` holds")
        return asked

    def _subject_issuer(self, subject: _Verified) -> str:
        if self._is_gateway_token(subject):
            sub_id = subject.claims.get("sub_id")
            if isinstance(sub_id, dict) and isinstance(sub_id.get("iss"), str):
                return str(sub_id["iss"])
        return subject.caller.subject.issuer

    @staticmethod
    def _task(subject: _Verified, actor: _Verified | None) -> str | None:
        task = subject.caller.credential.task
        other = actor.caller.credential.task if actor is not None else None
        if task is not None and other is not None and task != other:
            raise InvalidGrant("the subject and actor tokens belong to different tasks")
        return task or other

    @staticmethod
    def _session(subject: _Verified) -> str | None:
        sid = subject.claims.get("sid")
        return sid if isinstance(sid, str) and sid else None
