"""Minting gateway access tokens (JWT, RFC 9068 `at+jwt`).

A token names the subject (`sub`, and `sub_id` with the issuer that first
vouched for it, RFC 9493 `iss_sub`), its audience, its scope, its task and its
delegation chain as the RFC 8693 `act` claim: the current actor outermost,
prior actors nested inside::

    {"sub": "alice", "act": {"sub": "agent-b", "act": {"sub": "agent-a"}}}

`tenant`, `kind` and `groups` carry what the gateway's own issuer maps back
into a `Principal` when the token comes back. A sender-constrained token has
`cnf` (RFC 7800): `jkt`, the thumbprint of the DPoP key it is bound to (RFC
9449), and/or `x5t#S256`, that of the client certificate (RFC 8705).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwt

from idgate.identity.principal import Actor, Credential, Principal
from idgate.sts.errors import InvalidGrant
from idgate.sts.keys import SigningKeys

__all__ = ["UNBOUND", "Binding", "Grant", "MintedToken", "TokenMinter", "act_claim"]


@dataclass(frozen=True, slots=True)
class Binding:
    """What a token request proved possession of, and so what the new token is bound to.

    `jkt`: the thumbprint of the key of the request's verified DPoP proof; `x5t`:
    that of the client certificate of its mTLS connection, bound into the token
    when `bind_certificate`. A bound token presented in the request (a subject,
    actor or assertion token) is only accepted with a proof of its own key or
    certificate: a stolen bound token cannot be exchanged for an unbound one.
    """

    jkt: str | None = None
    x5t: str | None = None
    bind_certificate: bool = False

    def check(self, credential: Credential, what: str) -> None:
        """Refuse a presented token bound to a key or certificate this request did not prove."""
        if credential.jkt is not None and credential.jkt != self.jkt:
            raise InvalidGrant(f"`{what}` is DPoP-bound: send a `DPoP` proof signed with its key")
        if credential.x5t is not None and credential.x5t != self.x5t:
            raise InvalidGrant(f"`{what}` is bound to a client certificate: send it over mTLS with that certificate")

    @property
    def cnf(self) -> dict[str, str] | None:
        """The RFC 7800 `cnf` claim of the new token, or None for an unbound (bearer) one."""
        cnf: dict[str, str] = {}
        if self.jkt is not None:
            cnf["jkt"] = self.jkt
        if self.x5t is not None and self.bind_certificate:
            cnf["x5t#S256"] = self.x5t
        return cnf or None


UNBOUND = Binding()  # a request that proved possession of nothing


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token says: for whom, by whom, for what, until when."""

    subject: Principal
    subject_issuer: str  # the issuer that first vouched for the subject (not the gateway)
    audiences: tuple[str, ...]
    expires_at: int
    scope: tuple[str, ...] | None = None  # None: no scope claim at all
    actors: tuple[Actor, ...] = ()  # outermost (current) first
    task: str | None = None
    session: str | None = None  # `sid` of the subject's session, for logout
    claims: Mapping[str, Any] | None = None  # extra claims (e.g. a per-call token's `request_id`); never override
    cnf: Mapping[str, str] | None = None  # RFC 7800 confirmation: `jkt` (DPoP key) and/or `x5t#S256` (certificate)
    parents: tuple[str, ...] = ()  # ids of the tokens it was exchanged from: revoking one of them ends it


@dataclass(frozen=True, slots=True)
class MintedToken:
    token: str
    claims: dict[str, Any]
    expires_in: int


def act_claim(actors: tuple[Actor, ...]) -> dict[str, Any] | None:
    """The nested RFC 8693 `act` claim of a chain given outermost first."""
    act: dict[str, Any] | None = None
    for actor in reversed(actors):
        entry: dict[str, Any] = {"sub": actor.id, "kind": actor.kind}
        if actor.issuer is not None:
            entry["iss"] = actor.issuer
        if act is not None:
            entry["act"] = act
        act = entry
    return act


class TokenMinter:
    """Signs grants with the current signing key as the gateway's issuer."""

    def __init__(self, keys: SigningKeys, issuer: str, clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.issuer = issuer
        self._clock = clock

    def mint(self, grant: Grant) -> MintedToken:
        now = int(self._clock())
        if grant.expires_at <= now:
            raise ValueError("a grant must expire in the future")
        if not grant.audiences:
            raise ValueError("a grant needs an audience")
        subject = grant.subject
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject.id,
            "aud": grant.audiences[0] if len(grant.audiences) == 1 else list(grant.audiences),
            "iat": now,
            "nbf": now,
            "exp": grant.expires_at,
            "jti": secrets.token_urlsafe(16),
            "kind": subject.kind,
            "sub_id": {"format": "iss_sub", "iss": grant.subject_issuer, "sub": subject.id},
        }
        if subject.tenant is not None:
            claims["tenant"] = subject.tenant
        if subject.groups:
            claims["groups"] = list(subject.groups)
        if grant.scope is not None:
            claims["scope"] = " ".join(grant.scope)
        if grant.task is not None:
            claims["task"] = grant.task
        if grant.session is not None:
            claims["sid"] = grant.session
        if grant.cnf:
            claims["cnf"] = dict(grant.cnf)
        if grant.parents:
            claims["parents"] = list(grant.parents)
        for name, value in (grant.claims or {}).items():
            claims.setdefault(name, value)
        act = act_claim(grant.actors)
        if act is not None:
            claims["act"] = act
        key = self.keys.current()
        header = {"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}
        return MintedToken(jwt.encode(header, claims, key), claims, grant.expires_at - now)
