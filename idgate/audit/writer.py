"""The audit writer: records leave the request path at once, land in batches.

`emit()` appends to a deque (no lock, no wake-up); a background thread drains
it on a short timer and writes each batch in one SQLite transaction (WAL,
`synchronous=NORMAL`). If the store fails, the writer turns unhealthy, and
`emit()` refuses: the gateway fails closed rather than act unrecorded.
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
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_records_request ON audit_records (request_id);
CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (time);
"""


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, timeout=10.0, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(_SCHEMA)
    return connection


class AuditWriter:
    def __init__(self, path: Path, flush_interval: float = 0.005) -> None:
        self.path = path
        self._interval = flush_interval
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
        rows = [
            (r["request_id"], r["kind"], r["time"], (r.get("subject") or {}).get("id"), orjson.dumps(r)) for r in batch
        ]
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT INTO audit_records (request_id, kind, time, subject, record) VALUES (?, ?, ?, ?, ?)", rows
        )
        connection.execute("COMMIT")
        self.written += len(rows)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record, oldest first (for `idgate audit` and tests)."""
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute("SELECT record FROM audit_records ORDER BY seq").fetchall()
    finally:
        connection.close()
    return [orjson.loads(row[0]) for row in rows]
