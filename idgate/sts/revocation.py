"""Liveness: is this credential still alive? The per-call check behind every endpoint.

A token stays valid until `exp` by its signature alone; what can end it sooner
is in the state store's revocation log (`idgate.store`): the token itself (its
`jti`), a token it was exchanged from (its `parents`), its task (completed), its
login session (issuer + `sid`), its subject, an agent in its actor chain, or its
tenant. A subject entry of a session-end signal (back-channel logout, CAEP) ends
every token *issued* (`iat`) up to the moment of revocation, so a fresh login
afterwards works again; a token with no `iat` is taken as issued before any such
entry (fail closed).

The administrators' kill switch on a subject, an agent or a tenant is a *hold*
instead: while it stands, every token naming it is dead whatever its `iat`, and
since every grant of the token service checks the presented credentials here
(subject and actor tokens, JWT bearer assertions, client assertions), none is
issued either: an agent cannot re-authenticate its way out. A hold stands until an
administrator lifts it. In the log, a hold is an entry whose `until` is `HELD` and
a lift one whose `until` is `LIFTED` (both far in the future: neither is ever
forgotten, so a worker reading the log from the start replays both, by `seq`).

Each worker keeps the log in memory (sets and dicts: O(1) per call, no I/O on
the request path) and a background task reads what changed since the last
`seq` it saw every `liveness.poll_interval_seconds` (blocking store calls run
in a thread). A revocation made in this process applies at once; one made in
another applies here within one poll. If the view could not be refreshed for
`liveness.max_staleness_seconds`, a call first waits briefly for a fresh read
(one shared by every such call); if the store does not answer, the check cannot
be answered and the call is refused with 503: fail closed, never allow on stale
knowledge.

A task's end is also enforced without the store: a gateway token bound to a
task never outlives the task (`exp` ≤ the task's expiry, set at exchange),
and this check refuses such a token from its `exp` on, without the clock skew
the signature check allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from idgate.errors import InvalidToken, ServiceUnavailable
from idgate.identity.principal import Caller
from idgate.proxy.http import Request
from idgate.store.base import Revocation, RevocationKind, StateStore, StoreUnavailable

__all__ = ["ANY_ISSUER", "HELD", "HOLD_KINDS", "LIFTED", "Liveness"]

log = logging.getLogger("idgate.sts")

GATEWAY_ISSUER_NAME = "idgate"  # the name of the gateway's own issuer (see idgate.sts.service)
_PRUNE_EVERY = 60.0
_PAGE = 5000  # log entries read per query
_CATCH_UP_SECONDS = 0.25  # how long a call with a stale view waits for a fresh read before it is refused
ANY_ISSUER = "*"  # a session or subject entry that applies whichever issuer vouched for it
# The `until` of a kill-switch hold, and of its lift (9999-12-31): never forgotten, told apart exactly.
HELD = 253_402_300_799.0
LIFTED = 253_402_300_798.0
HOLD_KINDS = ("subject", "agent", "tenant")


class Liveness:
    """The in-memory view of the revocation log, and the `CredentialCheck` that consults it."""

    def __init__(
        self,
        store: StateStore,
        *,
        poll_interval: float = 0.05,
        max_staleness: float = 1.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        casefold_issuers: frozenset[str] = frozenset(),
    ) -> None:
        """`casefold_issuers`: issuers whose subject ids are email addresses (`claims.subject: email`):
        their subject entries and ids are compared without regard to case."""
        self.store = store
        self._casefold = casefold_issuers
        self._interval = poll_interval
        self._max_staleness = max_staleness
        self._clock = clock
        self._monotonic = monotonic
        self._seq = 0
        self._fresh_at: float | None = None  # monotonic time of the last read that succeeded
        self._task: asyncio.Task[None] | None = None
        self._catching_up: asyncio.Future[bool] | None = None
        # Its own thread: a busy default executor must not make the view stale.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idgate-liveness")
        self._failing = False
        self._pruned_at = 0.0
        # What is dead, each with the time its entry can be forgotten (`until`).
        # why: counts every change taken into the view, so a stream can tell at the cost of an int compare
        # whether to ask again (`Gate.changes`)
        self.generation = 0
        self._tokens: dict[str, float] = {}
        self._tasks: dict[str, float] = {}
        self._sessions: dict[tuple[str, str], float] = {}
        # Revoked-before: tokens issued up to `at` are dead; (at, until).
        self._subjects: dict[tuple[str, str], tuple[float, float]] = {}
        self._agents: dict[str, tuple[float, float]] = {}
        self._tenants: dict[str, tuple[float, float]] = {}
        # Kill-switch holds by (kind, issuer or "", value): the latest entry's seq and whether it holds.
        self._hold_seq: dict[tuple[str, str, str], tuple[int, bool]] = {}
        self._held: set[tuple[str, str, str]] = set()

    # -- the background refresh --------------------------------------------------------------------

    async def start(self) -> None:
        """Load the log (best effort: a store down at start-up means 503s until it answers) and start polling."""
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._reader.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()

    async def refresh(self) -> bool:
        """Read everything that changed since the last `seq`; True if the view is now current."""
        started = self._monotonic()
        loop = asyncio.get_running_loop()
        try:
            while True:  # in pages: the view is current only once the last page is in
                changes = await loop.run_in_executor(self._reader, self.store.changes, self._seq, self._clock(), _PAGE)
                for entry in changes:
                    self.apply(entry)
                if len(changes) < _PAGE:
                    break
        except StoreUnavailable as exc:
            if not self._failing:
                log.warning("liveness: the state store cannot be read (%s); refusing calls once stale", exc)
            self._failing = True
            return False
        except Exception:
            log.exception("liveness: reading the state store failed")
            self._failing = True
            return False
        if self._failing:
            log.info("liveness: the state store answers again")
        self._failing = False
        # The view is as fresh as the moment the read was issued.
        self._fresh_at = started
        if started - self._pruned_at > _PRUNE_EVERY:
            self._pruned_at = started
            now = self._clock()
            self._prune(now)
            try:  # the store's housekeeping: entries no token can need any more
                await loop.run_in_executor(self._reader, self.store.forget, now)
            except StoreUnavailable as exc:
                log.warning("liveness: old revocations could not be forgotten: %s", exc)
        return True

    def apply(self, entry: Revocation) -> None:
        """Take one log entry read from the store into the view (idempotent; entries may arrive twice)."""
        self._seq = max(self._seq, entry.seq)
        self._take(entry)

    def _take(self, entry: Revocation) -> None:
        self.generation += 1
        kind, value, issuer = entry.kind, entry.value, entry.issuer or ""
        if kind == "subject" and issuer in self._casefold:
            value = value.lower()  # an email address: compared without regard to case
        if kind in HOLD_KINDS and entry.until in (HELD, LIFTED):
            # A hold or its lift: the latest by `seq` decides, in whatever order they arrive.
            hold_key = (kind, issuer, value)
            seen = self._hold_seq.get(hold_key)
            if seen is None or entry.seq > seen[0]:
                holds = entry.until == HELD
                self._hold_seq[hold_key] = (entry.seq, holds)
                if holds:
                    self._held.add(hold_key)
                else:
                    self._held.discard(hold_key)
            return
        if kind == "token":
            self._tokens[value] = max(entry.until, self._tokens.get(value, 0.0))
        elif kind == "task":
            self._tasks[value] = max(entry.until, self._tasks.get(value, 0.0))
        elif kind == "session":
            key = (issuer, value)
            self._sessions[key] = max(entry.until, self._sessions.get(key, 0.0))
        elif kind == "subject":
            _later(self._subjects, (issuer, value), entry)
        elif kind == "agent":
            _later(self._agents, value, entry)
        elif kind == "tenant":
            _later(self._tenants, value, entry)

    def _prune(self, now: float) -> None:
        tables: tuple[dict[Any, float], ...] = (self._tokens, self._tasks, self._sessions)
        for table in tables:
            for key in [k for k, until in table.items() if until <= now]:
                del table[key]
        stamped_tables: tuple[dict[Any, tuple[float, float]], ...] = (self._subjects, self._agents, self._tenants)
        for stamped in stamped_tables:
            for key in [k for k, (_, until) in stamped.items() if until <= now]:
                del stamped[key]

    # -- writing ------------------------------------------------------------------------------------

    async def revoke(
        self,
        kind: RevocationKind,
        value: str,
        *,
        issuer: str | None = None,
        until: float,
        reason: str,
        by: str,
    ) -> Revocation:
        """Log a revocation in the store, and apply it here at once. Raises `StoreUnavailable`."""
        entry = await asyncio.to_thread(
            self.store.revoke, kind, value, issuer=issuer, at=self._clock(), until=until, reason=reason, by=by
        )
        # Applied here at once, but `seq` is not advanced: entries other workers wrote just before
        # this one may not have been read yet, and the next poll must still read them.
        self._take(entry)
        return entry

    async def hold(self, kind: RevocationKind, value: str, *, issuer: str | None, reason: str, by: str) -> Revocation:
        """The kill switch: every token naming this subject, agent or tenant is dead until `lift`."""
        if kind not in HOLD_KINDS:
            raise ValueError(f"only a subject, an agent or a tenant can be held, not a {kind}")
        return await self.revoke(kind, value, issuer=issuer, until=HELD, reason=reason, by=by)

    async def lift(self, kind: RevocationKind, value: str, *, issuer: str | None, reason: str, by: str) -> Revocation:
        """End a hold (`hold`); tokens revoked otherwise stay revoked."""
        if kind not in HOLD_KINDS:
            raise ValueError(f"only a hold on a subject, an agent or a tenant can be lifted, not on a {kind}")
        return await self.revoke(kind, value, issuer=issuer, until=LIFTED, reason=reason, by=by)

    def holds(self, kind: str, value: str, issuer: str | None = None) -> bool:
        """Whether a hold on exactly this subject (and issuer), agent or tenant stands in this view."""
        return (kind, issuer or "", value) in self._held

    def task_ended(self, task_id: str, until: float) -> None:
        """A task completed in this process: its tokens are dead here at once (the log entry follows by poll)."""
        self.generation += 1
        self._tasks[task_id] = max(until, self._tasks.get(task_id, 0.0))

    # -- the check ----------------------------------------------------------------------------------

    async def __call__(self, caller: Caller, request: Request) -> None:
        await self.verify(caller)

    async def verify(self, caller: Caller) -> None:
        """`check`, after catching up first if the view is stale (the loop was busy, a poll came late):
        a call is refused with 503 only when the store cannot answer within `_CATCH_UP_SECONDS`."""
        if not self.fresh:
            await self._catch_up()
        self.check(caller)

    async def _catch_up(self) -> None:
        # One read for every stale caller at once, never one each.
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.ensure_future(self.refresh())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._catching_up), _CATCH_UP_SECONDS)

    def check(self, caller: Caller) -> None:
        """Raise `InvalidToken` if the caller's credential is dead, `ServiceUnavailable` if this cannot be known."""
        if self._fresh_at is None or self._monotonic() - self._fresh_at > self._max_staleness:
            raise ServiceUnavailable("the revocation state cannot be checked right now; try again shortly")
        reason = self.dead(caller)
        if reason is not None:
            raise InvalidToken(f"token is no longer valid: {reason}")

    def dead(self, caller: Caller, now: float | None = None) -> str | None:
        """Why this credential is dead, or None if it is alive (the view's answer, not checking staleness)."""
        credential = caller.credential
        subject = caller.subject
        if credential.id in self._tokens:
            return "it was revoked"
        for parent in credential.parents:
            if parent in self._tokens:
                return "a token it was exchanged from was revoked"
        task = credential.task
        if task is not None:
            if task in self._tasks:
                return "its task has ended"
            if credential.issuer_name == GATEWAY_ISSUER_NAME and (now or self._clock()) >= credential.expires_at:
                return "its task has ended"
        sessions = self._sessions
        if credential.session is not None and (
            (subject.issuer, credential.session) in sessions or (ANY_ISSUER, credential.session) in sessions
        ):
            return "its session has ended"
        held = self._held
        if held:
            reason = self._held_reason(caller)
            if reason is not None:
                return reason
        issued = credential.issued_at
        subjects = self._subjects
        if subjects:
            folded = self._subject_id(caller)
            if (
                _before(subjects.get((subject.issuer, folded)), issued)
                or _before(subjects.get((ANY_ISSUER, subject.id)), issued)
                or _before(subjects.get((ANY_ISSUER, folded)), issued)
            ):
                return "its subject's tokens were revoked"
        if self._agents:
            if _before(self._agents.get(subject.id), issued):
                return "this agent's tokens were revoked"
            for actor in caller.actors:
                if _before(self._agents.get(actor.id), issued):
                    return "an agent acting in it was revoked"
        if subject.tenant is not None and _before(self._tenants.get(subject.tenant), issued):
            return "its tenant's tokens were revoked"
        return None

    def _subject_id(self, caller: Caller) -> str:
        """The subject's id as its entries are keyed: lower case where ids are email addresses."""
        subject = caller.subject
        return subject.id.lower() if subject.issuer in self._casefold else subject.id

    def _held_reason(self, caller: Caller) -> str | None:
        held, subject = self._held, caller.subject
        folded = self._subject_id(caller)
        if (
            ("subject", subject.issuer, folded) in held
            or ("subject", ANY_ISSUER, subject.id) in held
            or ("subject", ANY_ISSUER, folded) in held
        ):
            return "its subject is blocked by an administrator"
        if ("agent", "", subject.id) in held:
            return "this agent is blocked by an administrator"
        for actor in caller.actors:
            if ("agent", "", actor.id) in held:
                return "an agent acting in it is blocked by an administrator"
        if subject.tenant is not None and ("tenant", "", subject.tenant) in held:
            return "its tenant is blocked by an administrator"
        return None

    @property
    def fresh(self) -> bool:
        return self._fresh_at is not None and self._monotonic() - self._fresh_at <= self._max_staleness

    def stats(self) -> dict[str, Any]:
        return {
            "seq": self._seq,
            "tokens": len(self._tokens),
            "tasks": len(self._tasks),
            "sessions": len(self._sessions),
            "subjects": len(self._subjects),
            "agents": len(self._agents),
            "tenants": len(self._tenants),
            "held": len(self._held),
        }


def _later(table: dict[Any, tuple[float, float]], key: Any, entry: Revocation) -> None:
    at, until = table.get(key, (0.0, 0.0))
    table[key] = (max(at, entry.at), max(until, entry.until))


def _before(stamp: tuple[float, float] | None, issued_at: float | None) -> bool:
    """Whether a token issued at `issued_at` falls under a revoked-before entry."""
    if stamp is None:
        return False
    return issued_at is None or issued_at <= stamp[0]
