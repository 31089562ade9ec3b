"""Who is calling: the subject, the agents acting for it, and the credential."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Actor", "Caller", "Credential", "Kind", "Principal"]

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


@dataclass(frozen=True, slots=True)
class Credential:
    """What the caller presented, described without the secret itself."""

    kind: Literal["jwt", "jwt-svid", "dev"]
    id: str  # the `jti`, or a short hash of the token when it has none
    issuer_name: str
    expires_at: float
    binding: Binding = "none"
    task: str | None = None


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
