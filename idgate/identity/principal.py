"""Who is calling: the subject, the agents acting for it, and the credential."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Actor", "Caller", "Credential", "CredentialKind", "Kind", "Principal"]

Kind = Literal["human", "service", "agent"]
Binding = Literal["none", "dpop", "mtls"]


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified subject: a human, a service or an agent."""

    kind: Kind
    id: str
    tenant: str | None
    issuer: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Actor:
    """An agent acting for the subject (an entry of an RFC 8693 `act` chain)."""

    id: str
    kind: Kind = "agent"
    issuer: str | None = None


# What a caller presented: a JWT, a SPIFFE JWT-SVID, a dev token, or an X.509-SVID (a client
# certificate, idgate/identity/mtls.py).
CredentialKind = Literal["jwt", "jwt-svid", "dev", "x509-svid"]


@dataclass(frozen=True, slots=True)
class Credential:
    """What the caller presented, described without the secret itself.

    `binding` says what the token is bound to (RFC 7800 `cnf`): a DPoP key
    (`jkt`, RFC 9449) or a client certificate (`x5t#S256`, RFC 8705); the
    identity stage refuses a bound token presented without that proof.
    `session` is the `sid` of the login session the token derives from, and
    `parents` the ids of the tokens it was exchanged from (nearest first), so
    that ending a session, a task or a parent token ends this one too.
    """

    kind: CredentialKind
    id: str  # the `jti`, or a short hash of the token when it has none
    issuer_name: str
    expires_at: float
    binding: Binding = "none"
    task: str | None = None
    session: str | None = None
    parents: tuple[str, ...] = ()
    jkt: str | None = None  # `cnf.jkt`: the SHA-256 thumbprint of the DPoP key the token is bound to
    x5t: str | None = None  # `cnf.x5t#S256`: the SHA-256 thumbprint of the client certificate it is bound to
    issued_at: float | None = None  # `iat`: revoking a subject, agent or tenant ends the tokens issued until then


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified request maker: subject, actor chain (outermost first), credential."""

    subject: Principal
    credential: Credential
    actors: tuple[Actor, ...] = field(default=())

    @property
    def tenant(self) -> str | None:
        return self.subject.tenant

    @property
    def acting_agent(self) -> Actor | None:
        """The agent making this call for the subject, if any."""
        return self.actors[0] if self.actors else None
