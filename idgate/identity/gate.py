"""The identity and liveness stages as one call: who is calling, and may their credential still be used?

`Gate.caller(request)` is what every endpoint asks. It verifies the token with
the `Authenticator` (signature, issuer, times, audience: cached per token) — or,
for a request with no `Authorization` header, asks `certificate_identity` (an
X.509-SVID client certificate, `idgate.identity.mtls`) — then runs each
`CredentialCheck` in order on every call, never cached:

- a *binding* check proves the caller holds what the token is bound to
  (a DPoP proof for `cnf.jkt`, the client certificate for `cnf.x5t#S256`);
- the *liveness* check refuses a token that was revoked, whose task completed,
  whose session ended, or one exchanged from any of those.

A check refuses by raising an `AuthenticationError` (401) or, when it cannot
answer, a `ServiceUnavailable` (503): fail closed, never allow.

What outlives its request (an event stream open for hours) asks `Gate.recheck(caller)`
before it relays more: the checks whose answer can change without a new request
(added with `add_standing_check`: liveness) run again on the caller let in earlier, in memory; the
token is not read again, nor a binding proven again (a DPoP proof is single-use).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from idgate.errors import AuthenticationError, IdgateError, InvalidToken
from idgate.identity.authenticator import Authenticator
from idgate.identity.principal import Caller
from idgate.proxy.http import Request

__all__ = ["RECHECK_SECONDS", "CredentialCheck", "Gate", "StandingCheck"]

# What outlives its request asks `Gate.lapsed` again at least this often (at once when `Gate.changes` moves).
RECHECK_SECONDS = 1.0


class CredentialCheck(Protocol):
    """One per-call check of a verified caller's credential; raises to refuse."""

    async def __call__(self, caller: Caller, request: Request) -> None: ...


class StandingCheck(CredentialCheck, Protocol):
    """A `CredentialCheck` whose answer can change after the request was let in, and that can be asked again
    without one (`Liveness.verify`: revoked tokens, ended tasks and sessions, holds); it raises as the check does."""

    generation: int  # grows with every change to what `verify` answers from (revocations taken in, holds, ...)

    async def verify(self, caller: Caller) -> None: ...


class Gate:
    """Identity, then every credential check; the one way endpoints learn who calls."""

    def __init__(
        self,
        authenticator: Authenticator,
        checks: Sequence[CredentialCheck] = (),
        *,
        resource_metadata: str | None = None,
        certificate_identity: Callable[[Request], Awaitable[Caller]] | None = None,
    ) -> None:
        """`resource_metadata`: the RFC 9728 metadata URL every refusal points clients to.
        `certificate_identity`: who a request without `Authorization` is, from its client
        certificate (an X.509-SVID, idgate/identity/mtls.py); without it, such a request is refused."""
        self.authenticator = authenticator
        self._certificate_identity = certificate_identity
        self._checks = tuple(checks)
        self._standing: tuple[StandingCheck, ...] = ()
        self._resource_metadata = resource_metadata

    def add_check(self, check: CredentialCheck) -> None:
        self._checks = (*self._checks, check)

    def add_standing_check(self, check: StandingCheck) -> None:
        """A check run on every request, and again by `recheck` for what outlives its request."""
        self.add_check(check)
        self._standing = (*self._standing, check)

    async def caller(self, request: Request) -> Caller:
        authorization = request.header(b"authorization")
        try:
            if authorization is None and self._certificate_identity is not None:
                caller = await self._certificate_identity(request)
            else:
                caller = await self.authenticator.authenticate(authorization)
            for check in self._checks:
                await check(caller, request)
        except AuthenticationError as refusal:
            refusal.resource_metadata = refusal.resource_metadata or self._resource_metadata
            raise
        return caller

    @property
    def changes(self) -> int:
        """Grows whenever an answer of `recheck` may have changed: what a stream compares before each relay."""
        total = 0
        for check in self._standing:
            total += check.generation
        return total

    async def recheck(self, caller: Caller) -> None:
        """Whether `caller`, let in by `caller()` earlier, may still be served now: every `StandingCheck` runs again.

        For what outlives its request (an event stream), before each thing it relays; in memory (a liveness view
        gone stale first waits briefly for a fresh read, as a request would). Nothing request-bound is checked again
        (signature, audience, binding): the credential was verified once. Nor is its expiry: whoever asks checks
        `caller.credential.expires_at` against its own clock. Raises as `caller()` does: an `AuthenticationError`
        if the credential is dead now, a `ServiceUnavailable` if that cannot be known."""
        for check in self._standing:
            await check.verify(caller)

    async def lapsed(self, caller: Caller, now: float) -> IdgateError | None:
        """Why `caller`'s credential, let in earlier, may no longer be used, or None while it may.

        Its expiry at `now` (epoch seconds, with the clock skew its admission allowed; code `credential_expired`),
        then `recheck` (`credential_revoked` with liveness's reason, or the error that says it cannot be known now:
        fail closed). For what outlives its request, before it relays more."""
        if now > caller.credential.expires_at + self.authenticator.clock_skew:  # as the token was let in
            expired = InvalidToken("the caller's credential expired while the request was under way")
            expired.code = "credential_expired"
            return expired
        try:
            await self.recheck(caller)
        except AuthenticationError as error:
            error.code = "credential_revoked"
            return error
        except IdgateError as error:
            return error
        return None
