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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from idgate.errors import AuthenticationError
from idgate.identity.authenticator import Authenticator
from idgate.identity.principal import Caller
from idgate.proxy.http import Request

__all__ = ["CredentialCheck", "Gate"]


class CredentialCheck(Protocol):
    """One per-call check of a verified caller's credential; raises to refuse."""

    async def __call__(self, caller: Caller, request: Request) -> None: ...


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
        self._resource_metadata = resource_metadata

    def add_check(self, check: CredentialCheck) -> None:
        self._checks = (*self._checks, check)

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
