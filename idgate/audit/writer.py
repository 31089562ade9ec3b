"""The audit writer: records leave the request path at once, land in batches.

Two ways in:

- `emit(record)` appends to a queue and returns: the record is committed with
  the next batch (within `flush_interval` seconds). For what is written after
  the fact (how a request ended, an action taken).
- `await commit(*records)` returns once the records are durable: what puts a
  request's decision on record *before* its upstream call (invariant 6).
  - For a SQLite trail (the default), durable means appended to this process's
    commit journal (`idgate.audit.journal`): one `write(2)`, no transaction
    on the request path; the writer moves them into the trail with the next
    batch, and a restart after a crash moves what a dead process left.
  - For PostgreSQL, durable means in the database: the writer is woken once
    per turn of the event loop, so the commits of every request handled in
    that turn share one transaction (group commit), and `commit` resolves when
    it is committed; a commit that fails or takes longer than
    `commit_timeout` raises `ServiceUnavailable`.

A background thread writes each batch in one transaction of its `Store`
(SQLite by default, PostgreSQL: `idgate.audit.stores`). If the store fails,
the writer turns unhealthy and `emit()` / `commit()` refuse: the gateway fails
closed rather than act unrecorded. The records that were already past (how
requests ended, and everything journaled) are retried until the store takes
them; the records of a PostgreSQL commit that failed are dropped, as their
requests were refused. When the store is back, the writer is healthy again,
and it records how many reads went unrecorded meanwhile
(`note_unrecorded_read`, for `fail_open_reads`).

The store chains each record to the one before it (`idgate.audit.chain`),
taking the head inside the batch's own write transaction, so several
processes appending to one trail extend one chain, and signs the head every
`checkpoint_every` records and at a clean close.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from idgate.audit.chain import CheckpointSigner, canonical
from idgate.audit.journal import Journal, journal_folder, left_over
from idgate.audit.records import action_record
from idgate.audit.stores import DEFAULT_CHECKPOINT_EVERY, SqliteStore, Store, read_records
from idgate.errors import ServiceUnavailable

__all__ = ["DEFAULT_CHECKPOINT_EVERY", "AuditWriter", "read_records"]

log = logging.getLogger("idgate.audit")

RETRY_SECONDS = 0.5
PRUNE_EVERY_SECONDS = 3600.0
_UNAVAILABLE = "the audit trail cannot record right now; nothing was forwarded"


class _Waiter:
    """One `commit()` call: resolved on its loop when the batch holding its records is committed."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        self.loop = loop
        self.future = future


def _parse(journal: str, position: int, line: bytes) -> dict[str, Any]:
    """A journal line as a record; `ValueError` naming the file and byte if it is not one."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        record = None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("request_id"), str)
        or not isinstance(record.get("kind"), str)
        or not isinstance(record.get("time"), int | float)
        or not isinstance(record.get("subject"), dict | None)
    ):
        raise ValueError(
            f"audit journal `{journal}`: the line at byte {position} is not a record; the file was altered."
            " Keep it for review and move it out of the journal folder to start."
        )
    return record


def _settle(waiters: list[_Waiter], error: str | None) -> None:
    """On the waiters' loop: resolve (or fail) each future still waiting."""
    for waiter in waiters:
        if not waiter.future.done():
            if error is None:
                waiter.future.set_result(None)
            else:
                waiter.future.set_exception(ServiceUnavailable(_UNAVAILABLE))


def _expire(future: asyncio.Future[None]) -> None:
    """A commit that took longer than `commit_timeout`: refused, as if the store had failed."""
    if not future.done():
        future.set_exception(ServiceUnavailable(_UNAVAILABLE))


Sink = Callable[[list[dict[str, Any]]], None]
"""Called on the writer's thread with each committed batch (exports); must not raise."""

_Item = tuple[dict[str, Any], bytes | None, _Waiter | None, tuple[str, int] | None]
"""A queued record: its canonical bytes (if journaled), its `commit()` call (PostgreSQL), its journal mark."""

RECOVER_BATCH = 5000  # records of a left-over journal moved per transaction


class AuditWriter:
    def __init__(
        self,
        path: Path | None = None,
        flush_interval: float = 0.05,
        *,
        sign: CheckpointSigner | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        store: Store | None = None,
        commit_timeout: float = 5.0,
        sinks: tuple[Sink, ...] = (),
        retention_seconds: float | None = None,
    ) -> None:
        """A writer into `store`, or into a SQLite trail at `path`; `sign` signs checkpoints (none without it).

        `sinks` get each committed batch (exports); `retention_seconds` prunes older records
        at start and hourly (`Store.prune`).
        """
        if store is None:
            if path is None:
                raise ValueError("give a store or a path")
            store = SqliteStore(path, sign=sign, checkpoint_every=checkpoint_every)
        self.store = store
        self.path = path
        self._interval = flush_interval
        self._commit_timeout = commit_timeout
        self._sinks = sinks
        self._retention = retention_seconds
        self._next_prune = 0.0
        self._pending: deque[_Item] = deque()
        self._retry: list[_Item] = []
        self._wake = threading.Event()
        self._kick_scheduled = False
        # why: a local trail's commits go to a journal beside it (same disk, same durability);
        # a remote store's commits go to the store itself, or they would not survive this machine.
        self.journal = Journal(journal_folder(store.path)) if isinstance(store, SqliteStore) else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._unrecorded: list[float] = []  # times of reads served while the store was down
        self.emitted = 0  # counted on the event loop's thread
        self.written = 0  # counted on the writer's thread, after each commit
        self.dropped = 0  # records of failed commits (their requests were refused)
        self.batches = 0

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self.store.open()  # fail at start, not on the first request
        if self.journal is not None:
            self._recover()
            self.journal.open()
        self._thread = threading.Thread(target=self._run, name="idgate-audit", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise `ServiceUnavailable` unless records can be taken."""
        if not self.healthy:
            raise ServiceUnavailable(_UNAVAILABLE)

    def emit(self, record: dict[str, Any]) -> None:
        """Queue `record` for the next batch; `ServiceUnavailable` if the trail cannot take it."""
        self.check()
        self._pending.append((record, None, None, None))
        self.emitted += 1

    async def commit(self, *records: dict[str, Any]) -> None:
        """Return once `records` are durable (journal or store); `ServiceUnavailable` if they are not."""
        self.check()
        if self.journal is not None:
            self._journal(records)
            return
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, loop.create_future())
        for record in records:
            self._pending.append((record, None, waiter, None))
        self.emitted += len(records)
        if not self._kick_scheduled:
            # why: the writer is woken once per turn of the loop, not once per commit, so the
            # commits of every request handled in this turn share one transaction (group commit);
            # waking it per call put each record alone in a transaction under load.
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        # why: a timer handle, not `asyncio.timeout()`: ~3 us instead of ~20 us per commit.
        expiry = loop.call_later(self._commit_timeout, _expire, waiter.future)
        try:
            await waiter.future
        finally:
            expiry.cancel()

    def _journal(self, records: tuple[dict[str, Any], ...]) -> None:
        assert self.journal is not None
        if not records:
            return
        bodies = [canonical(record) for record in records]
        try:
            mark = self.journal.append(b"\n".join(bodies) + b"\n")
        except OSError as exc:
            log.error("audit journal append failed, refusing the request: %s", exc)
            raise ServiceUnavailable(_UNAVAILABLE) from None
        # INVARIANT: queued in journal order, with no await between the append and here,
        # so a batch reaches a prefix of each journal file (its mark is the batch's last).
        last = len(records) - 1
        for i, record in enumerate(records):
            self._pending.append((record, bodies[i], None, mark if i == last else None))
        self.emitted += len(records)

    def _kick(self) -> None:
        self._kick_scheduled = False
        self._wake.set()

    def note_unrecorded_read(self) -> None:
        """A read served while the store was down (`audit.fail_open_reads`); on record when it is back."""
        self._unrecorded.append(time.time())

    def close(self, timeout: float = 5.0) -> None:
        if self.journal is not None:
            self.journal.seal()  # a commit from now on is refused: the last batch will hold everything
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.journal is not None:
            # Everything journaled is in the trail unless the writer failed or is stuck:
            # then the files stay, and the next start moves them.
            stuck = self._thread is not None and self._thread.is_alive()
            self.journal.close(settled=not stuck and self._error is None, stuck=stuck)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what was emitted so far is committed (tests, shutdown); False if it was not."""
        target = self.emitted
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.written + self.dropped < target:
            if not self.healthy or time.monotonic() > deadline:
                return False
            time.sleep(min(self._interval / 4, 0.002))
        return True

    # -- the writer's thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(RETRY_SECONDS if self._error else self._interval)
                self._wake.clear()
                if self.journal is not None and self.journal.replace_if_gone():
                    log.error(
                        "audit journal file deleted under the gateway; writing a new one in %s", self.journal.folder
                    )
                self._drain()
                if self._retention is not None and self._error is None and time.monotonic() >= self._next_prune:
                    self._prune()
            self._drain()
            if self._error is None:
                self.store.close_checkpoint()
        except Exception as exc:  # noqa: BLE001 - a bug here stops the gateway from acting
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self._fail_waiters(self._take())
            self.store.close()
            for sink in self._sinks:
                close = getattr(sink, "close", None)
                if close is not None:
                    close()

    def _take(self) -> list[_Item]:
        batch = self._retry
        self._retry = []
        pop = self._pending.popleft
        try:
            while True:
                batch.append(pop())
        except IndexError:
            pass
        return batch

    def _drain(self) -> None:
        batch = self._take()
        if not batch and not (self._error is None and self._unrecorded):
            if self._error is not None:
                self._probe()
            return
        records = [item[0] for item in batch]
        bodies = [item[1] or canonical(item[0]) for item in batch]
        if self._error is None and self._unrecorded:
            late = self._unrecorded_record()
            records.append(late)
            bodies.append(canonical(late))
        marks = {item[3][0]: item[3][1] for item in batch if item[3] is not None}
        try:
            if isinstance(self.store, SqliteStore):
                self.store.append(records, bodies, marks)
            else:
                self.store.append(records, bodies)
        except Exception as exc:  # noqa: BLE001 - any failure to record stops the gateway from acting
            self._fail(f"{type(exc).__name__}: {exc}")
            # Records of requests that already went on (emitted or journaled) are kept for the
            # next try; those of a PostgreSQL commit() are dropped: their requests are refused.
            self._retry = [item for item in batch if item[2] is None]
            self.dropped += len(batch) - len(self._retry)
            self._fail_waiters(batch)
            return
        if self._error is not None:
            log.warning("audit store is back; recording again")
            self._error = None
        if records and records[-1].get("action") == "unrecorded_reads":
            self._unrecorded.clear()
        if marks and self.journal is not None:
            self.journal.settled(marks)
        self.written += len(batch)  # why: after `settled`, so `flush()` also waits for the files' deletion
        self.batches += 1
        self._resolve(batch)
        self._export(records)

    def _recover(self) -> None:
        """Move into the trail what stopped processes left in their journals (at start, before serving)."""
        store = self.store
        assert isinstance(store, SqliteStore) and self.journal is not None
        moved = 0
        for left in left_over(self.journal.folder):
            try:
                position = store.journal_position(left.name)
                lines = left.lines(position)
                for start in range(0, len(lines), RECOVER_BATCH):
                    chunk = lines[start : start + RECOVER_BATCH]
                    records = []
                    for line in chunk:
                        records.append(_parse(left.name, position, line))
                        position += len(line) + 1
                    store.append(records, chunk, {left.name: position})
            except BaseException:
                left.release()  # left as it is (what was moved is noted), for the next start
                raise
            moved += len(lines)
            left.remove()
        gone = [name for name in store.journal_names() if not (self.journal.folder / name).exists()]
        store.forget_journals(gone)
        if moved:
            log.warning("audit: moved %d records from journals of processes that stopped into the trail", moved)

    def _export(self, records: list[dict[str, Any]]) -> None:
        for sink in self._sinks:
            try:
                sink(records)
            except Exception:  # an export failing loses copies, never records
                log.exception("audit export failed")

    def _prune(self) -> None:
        assert self._retention is not None
        self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        try:
            pruned = self.store.prune(time.time() - self._retention)
        except Exception as exc:  # noqa: BLE001 - pruning fails safe: nothing is deleted
            log.warning("audit retention: pruning failed: %s", type(exc).__name__)
            return
        if pruned:
            log.info("audit retention: %d records older than %.0f s pruned", pruned, self._retention)

    def _probe(self) -> None:
        """While unhealthy with nothing to retry: is the store back?"""
        try:
            self.store.ping()
        except Exception:  # noqa: BLE001 - still down
            return
        log.warning("audit store is back; recording again")
        self._error = None

    def _unrecorded_record(self) -> dict[str, Any]:
        times = self._unrecorded
        return action_record(
            f"unrecorded-{int(times[0] * 1000)}",
            None,
            None,
            "unrecorded_reads",
            "GET /v1/models",
            "recorded_late",
            {"count": len(times), "first": times[0], "last": times[-1], "recorded_at": time.time()},
        )

    def _fail(self, error: str) -> None:
        if self._error is None:
            log.error("audit store failed, refusing requests: %s", error)
        self._error = error

    @staticmethod
    def _group(batch: list[_Item]) -> dict[asyncio.AbstractEventLoop, list[_Waiter]]:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Waiter]] = {}
        last: _Waiter | None = None
        for _, _, waiter, _ in batch:
            if waiter is not None and waiter is not last:
                by_loop.setdefault(waiter.loop, []).append(waiter)
                last = waiter
        return by_loop

    def _resolve(self, batch: list[_Item]) -> None:
        # why: one call into each loop per batch, not one per waiter
        for loop, waiters in self._group(batch).items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, waiters, None)

    def _fail_waiters(self, batch: list[_Item]) -> None:
        for loop, waiters in self._group(batch).items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, waiters, self._error or "closed")
