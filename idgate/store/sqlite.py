"""The state store in one SQLite file (`STATE/state.db`): the single-machine default.

WAL mode lets every worker process of `idgate serve --workers N` read while one
writes; writes take the write lock up front (`BEGIN IMMEDIATE`), so `seq`
values (an `AUTOINCREMENT` key) become visible in the order they were handed
out. One connection per store object, shared by the threads that call it under
a lock (calls are short; the hot path never calls the store).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from idgate.store.base import Revocation, RevocationKind, StoreUnavailable, Task

__all__ = ["SqliteStateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    subject_issuer TEXT NOT NULL,
    owner_actors TEXT NOT NULL,
    tenant TEXT,
    purpose TEXT NOT NULL,
    scope TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    completed_at REAL,
    completed_by TEXT
);
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    issuer TEXT,
    at REAL NOT NULL,
    until REAL NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS revocations_until ON revocations (until);
CREATE TABLE IF NOT EXISTS seen_once (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""

_TASK_COLUMNS = (
    "id, subject, subject_issuer, owner_actors, tenant, purpose, scope, created_at, expires_at, completed_at, "
    "completed_by"
)
_REVOCATION_COLUMNS = "seq, kind, value, issuer, at, until, reason, by"


def task_row(task: Task) -> tuple[Any, ...]:
    """A task as the column values both SQL backends store."""
    return (
        task.id,
        task.subject,
        task.subject_issuer,
        orjson.dumps(list(task.owner_actors)).decode(),
        task.tenant,
        task.purpose,
        None if task.scope is None else orjson.dumps(list(task.scope)).decode(),
        task.created_at,
        task.expires_at,
        task.completed_at,
        task.completed_by,
    )


def task_from_row(row: tuple[Any, ...]) -> Task:
    scope = None if row[6] is None else tuple(orjson.loads(row[6]))
    return Task(
        id=row[0],
        subject=row[1],
        subject_issuer=row[2],
        owner_actors=tuple(orjson.loads(row[3])),
        tenant=row[4],
        purpose=row[5],
        scope=scope,
        created_at=float(row[7]),
        expires_at=float(row[8]),
        completed_at=None if row[9] is None else float(row[9]),
        completed_by=row[10],
    )


def revocation_from_row(row: tuple[Any, ...]) -> Revocation:
    return Revocation(int(row[0]), row[1], row[2], row[3], float(row[4]), float(row[5]), row[6], row[7])


class SqliteStateStore:
    """`StateStore` over one SQLite file, shared by every process of one machine."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                connection = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0, isolation_level=None)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.execute("PRAGMA busy_timeout=5000")
                connection.executescript(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise StoreUnavailable(f"state store `{self.path}` cannot be opened: {exc}") from None
            self._connection = connection
        return self._connection

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._connect()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"state store `{self.path}`: {exc}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            connection = self._connect()
            try:
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"state store `{self.path}`: {exc}") from None
            try:
                yield connection
                connection.execute("COMMIT")
            except sqlite3.Error as exc:
                connection.execute("ROLLBACK")
                raise StoreUnavailable(f"state store `{self.path}`: {exc}") from None
            except BaseException:
                connection.execute("ROLLBACK")
                raise

    def create_task(self, task: Task) -> None:
        with self._write() as db:
            db.execute(f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", task_row(task))  # noqa: S608

    def get_task(self, task_id: str) -> Task | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()  # noqa: S608
        return None if row is None else task_from_row(row)

    def complete_task(self, task_id: str, by: str, at: float, until: float) -> Task | None:
        with self._write() as db:
            row = db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()  # noqa: S608
            if row is None:
                return None
            task = task_from_row(row)
            if task.completed_at is not None:
                return task
            db.execute("UPDATE tasks SET completed_at = ?, completed_by = ? WHERE id = ?", (at, by, task_id))
            db.execute(
                "INSERT INTO revocations (kind, value, issuer, at, until, reason, by) VALUES (?,?,?,?,?,?,?)",
                ("task", task_id, None, at, max(until, task.expires_at), "task completed", by),
            )
        return dataclasses.replace(task, completed_at=at, completed_by=by)

    def revoke(
        self, kind: RevocationKind, value: str, *, issuer: str | None, at: float, until: float, reason: str, by: str
    ) -> Revocation:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO revocations (kind, value, issuer, at, until, reason, by) VALUES (?,?,?,?,?,?,?)",
                (kind, value, issuer, at, until, reason, by),
            )
            seq = cursor.lastrowid
        assert seq is not None
        return Revocation(seq, kind, value, issuer, at, until, reason, by)

    def changes(self, since: int, now: float, limit: int = 10_000) -> list[Revocation]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_REVOCATION_COLUMNS} FROM revocations WHERE seq > ? AND until > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (since, now, limit),
            ).fetchall()
        return [revocation_from_row(row) for row in rows]

    def head(self) -> int:
        with self._read() as db:
            row = db.execute("SELECT max(seq) FROM revocations").fetchone()
        return int(row[0] or 0)

    def once(self, namespace: str, key: str, until: float) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO seen_once (namespace, key, until) VALUES (?,?,?)", (namespace, key, until)
            )
            return cursor.rowcount == 1

    def forget(self, now: float) -> int:
        with self._write() as db:
            gone = db.execute("DELETE FROM revocations WHERE until <= ?", (now,)).rowcount
            gone += db.execute("DELETE FROM seen_once WHERE until <= ?", (now,)).rowcount
        return gone

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
