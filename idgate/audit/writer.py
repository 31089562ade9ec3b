"""The audit writer: records leave the request path at once, land in batches.

`emit()` appends to a deque (no lock, no wake-up); a background thread drains
it on a short timer and writes each batch in one SQLite transaction (WAL,
`synchronous=NORMAL`). If the store fails, the writer turns unhealthy, and
`emit()` refuses: the gateway fails closed rather than act unrecorded.

Each record is chained to the one before it (`idgate.audit.chain`). The writer
takes the chain's head inside the batch's own write transaction (`BEGIN
IMMEDIATE`), so several processes appending to one file extend one chain.
Every `checkpoint_every` records, and at a clean close, it signs the head into
`audit_checkpoints` when it was given a signer.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from idgate.audit.chain import GENESIS, CheckpointSigner, link
from idgate.errors import ServiceUnavailable

__all__ = ["AuditWriter", "read_records"]

log = logging.getLogger("idgate.audit")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    subject TEXT,
    record BLOB NOT NULL,
    prev_hash TEXT,
    hash TEXT
);
CREATE INDEX IF NOT EXISTS audit_records_request ON audit_records (request_id);
CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (time);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    time REAL NOT NULL,
    jws TEXT NOT NULL
);
"""

DEFAULT_CHECKPOINT_EVERY = 1000


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, timeout=10.0, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(_SCHEMA)
    columns = {row[1] for row in connection.execute("PRAGMA table_info(audit_records)")}
    for column in ("prev_hash", "hash"):  # a trail written before the chain: its records stay unchained
        if column not in columns:
            try:
                connection.execute(f"ALTER TABLE audit_records ADD COLUMN {column} TEXT")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise
    return connection


def _head(connection: sqlite3.Connection) -> tuple[int, str]:
    """The last record's seq and hash (0 and `GENESIS` for an empty trail); call inside the write transaction."""
    row = connection.execute("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS) if row is None else (row[0], row[1] or GENESIS)


def _last_checkpoint(connection: sqlite3.Connection) -> int:
    row = connection.execute("SELECT max(seq) FROM audit_checkpoints").fetchone()
    return int(row[0] or 0)


class AuditWriter:
    def __init__(
        self,
        path: Path,
        flush_interval: float = 0.005,
        *,
        sign: CheckpointSigner | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> None:
        """`sign` signs checkpoints of the chain's head (none are written without it)."""
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.path = path
        self._interval = flush_interval
        self._sign = sign
        self._checkpoint_every = checkpoint_every
        self._pending: deque[dict[str, Any]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self.emitted = 0  # counted on the event loop's thread
        self.written = 0  # counted on the writer's thread, after each commit

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = _connect(self.path)  # fail at start, not on the first request
        self._thread = threading.Thread(target=self._run, args=(connection,), name="idgate-audit", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise `ServiceUnavailable` unless records can be taken."""
        if not self.healthy:
            raise ServiceUnavailable("the audit trail cannot record right now; nothing was forwarded")

    def emit(self, record: dict[str, Any]) -> None:
        self.check()
        self._pending.append(record)
        self.emitted += 1

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what was emitted so far is committed (tests, shutdown); False if it was not."""
        target = self.emitted
        deadline = time.monotonic() + timeout
        while self.written < target:
            if not self.healthy or time.monotonic() > deadline:
                return False
            time.sleep(self._interval / 2)
        return True

    def _run(self, connection: sqlite3.Connection) -> None:
        try:
            while not self._stop.is_set():
                time.sleep(self._interval)
                self._drain(connection)
            self._drain(connection)
            if self._sign is not None:
                self._close_checkpoint(connection)
        except Exception as exc:  # noqa: BLE001 - any failure to record stops the gateway from acting
            self._error = f"{type(exc).__name__}: {exc}"
            log.error("audit store failed, refusing requests: %s", self._error)
        finally:
            connection.close()

    def _drain(self, connection: sqlite3.Connection) -> None:
        if not self._pending:
            return
        batch: list[dict[str, Any]] = []
        pop = self._pending.popleft
        try:
            while True:
                batch.append(pop())
        except IndexError:
            pass
        # INVARIANT: the head is read and extended under one write lock, so no other
        # writer appends between them; `seq` then follows the batch's order.
        connection.execute("BEGIN IMMEDIATE")
        try:
            _, prev = _head(connection)
            rows = []
            for r in batch:
                body = orjson.dumps(r, option=orjson.OPT_SORT_KEYS)  # the canonical bytes (chain.canonical)
                digest = link(prev, body)
                rows.append(
                    (r["request_id"], r["kind"], r["time"], (r.get("subject") or {}).get("id"), body, prev, digest)
                )
                prev = digest
            connection.executemany(
                "INSERT INTO audit_records (request_id, kind, time, subject, record, prev_hash, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if self._sign is not None:
                seq = connection.execute("SELECT last_insert_rowid()").fetchone()[0]
                if seq - _last_checkpoint(connection) >= self._checkpoint_every:
                    self._checkpoint(connection, seq, prev)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        self.written += len(rows)

    def _checkpoint(self, connection: sqlite3.Connection, seq: int, digest: str) -> None:
        assert self._sign is not None
        now = time.time()
        token = self._sign({"seq": seq, "hash": digest, "time": now})
        connection.execute(
            "INSERT INTO audit_checkpoints (seq, hash, time, jws) VALUES (?, ?, ?, ?)", (seq, digest, now, token)
        )

    def _close_checkpoint(self, connection: sqlite3.Connection) -> None:
        """At a clean close: sign the head unless a checkpoint already covers it."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            seq, digest = _head(connection)
            if seq > _last_checkpoint(connection):
                self._checkpoint(connection, seq, digest)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record, oldest first (for `idgate audit` and tests)."""
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute("SELECT record FROM audit_records ORDER BY seq").fetchall()
    finally:
        connection.close()
    return [orjson.loads(row[0]) for row in rows]
