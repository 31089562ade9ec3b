"""What the state store keeps, and the interface every backend implements.

Two kinds of state outlive one request and must be shared by every worker and
replica of the gateway:

- **tasks**: a unit of work a caller started (`POST /tasks`): who owns it, for
  which subject, its purpose and scope ceiling, until when it may run, and
  whether it was completed (and by whom);
- **revocations**: an append-only log of "this is dead now" entries, each of
  one kind: a token (`jti`), a task, a login session (issuer + `sid`), a
  subject (issuer + `sub`), an agent (actor id) or a tenant. Each entry has a
  strictly increasing `seq`, so a worker keeps an in-memory view and asks only
  "what changed since seq N" (`changes`). An entry carries `until`: after it
  no token it could apply to is alive any more, so it can be forgotten;
- **counters**: shared counts (the MCP tool-call budgets), added to atomically
  with a limit (`count_up`), each forgotten after its `until`.

Backends (`idgate.store.sqlite`, `idgate.store.postgres`) are synchronous: the
async side calls them in a thread, never on the event loop. One contract test
suite (`tests/store/`) runs over each of them.

The `seq` numbers are handed out in commit order (writers take the store's
write lock first), so a reader that has seen `seq` N has seen every entry
below it: a later poll never misses one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

__all__ = [
    "REVOCATION_KINDS",
    "Counter",
    "Revocation",
    "RevocationKind",
    "StateStore",
    "StoreUnavailable",
    "Task",
    "TaskStatus",
]

RevocationKind = Literal["token", "task", "session", "subject", "agent", "tenant"]
REVOCATION_KINDS: tuple[str, ...] = get_args(RevocationKind)
TaskStatus = Literal["active", "completed", "expired"]


class StoreUnavailable(Exception):
    """The store could not be reached or could not answer (the caller fails closed)."""


@dataclass(frozen=True, slots=True)
class Task:
    """A task: started by `owner` (subject and actor chain) for `subject`, within `scope`, until `expires_at`."""

    id: str
    subject: str  # the subject it acts for
    subject_issuer: str
    owner_actors: tuple[str, ...]  # the agents that started it for the subject, outermost first
    tenant: str | None
    purpose: str
    scope: tuple[str, ...] | None  # a ceiling for the tokens bound to it; None: no scope of its own
    created_at: float
    expires_at: float
    completed_at: float | None = None
    completed_by: str | None = None

    def status(self, now: float) -> TaskStatus:
        if self.completed_at is not None:
            return "completed"
        return "expired" if now >= self.expires_at else "active"


@dataclass(frozen=True, slots=True)
class Counter:
    """A shared counter (e.g. a tool-call budget): `key`, the count it may reach, kept until `until`."""

    key: str
    limit: int
    until: float


@dataclass(frozen=True, slots=True)
class Revocation:
    """One entry of the revocation log. `issuer` qualifies `value` for sessions and subjects."""

    seq: int
    kind: RevocationKind
    value: str
    issuer: str | None
    at: float  # when it was revoked: subject, agent and tenant entries apply to tokens issued up to then
    until: float  # after this it can be forgotten (no token it applies to is alive)
    reason: str
    by: str


class StateStore(Protocol):
    """Tasks and the revocation log. Every method may raise `StoreUnavailable`."""

    def create_task(self, task: Task) -> None: ...

    def get_task(self, task_id: str) -> Task | None: ...

    def complete_task(self, task_id: str, by: str, at: float, until: float) -> Task | None:
        """Mark an active task completed and log a `task` revocation, in one transaction.

        The task as it is now (already completed: unchanged), or None if there is none.
        """
        ...

    def revoke(
        self, kind: RevocationKind, value: str, *, issuer: str | None, at: float, until: float, reason: str, by: str
    ) -> Revocation: ...

    def changes(self, since: int, now: float, limit: int = 10_000) -> list[Revocation]:
        """Entries with `seq > since` still in force at `now` (`until > now`), by `seq`."""
        ...

    def head(self) -> int:
        """The highest `seq` handed out so far (0 for none)."""
        ...

    def once(self, namespace: str, key: str, until: float) -> bool:
        """Remember `key` until `until`; True the first time, False if it was seen (replay)."""
        ...

    def count_up(self, counters: Sequence[Counter], now: float) -> tuple[bool, tuple[int, ...]]:
        """Add one to every counter, atomically (one transaction), unless one is at its `limit` already.

        (True, the counts after) — or (False, the counts as found), nothing changed. A counter past
        its `until` counts from 0 again; each one added to is kept until at least its `until`.
        """
        ...

    def forget(self, now: float) -> int:
        """Delete log entries, remembered keys and counters no longer in force; how many went."""
        ...

    def close(self) -> None: ...
