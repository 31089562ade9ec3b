"""The state store in one SQLite file (`STATE/state.db`): the single-machine default.

WAL mode lets every worker process of `idgate serve --workers N` read while one
writes; writes take the write lock up front (`BEGIN IMMEDIATE`), so `seq`
values (an `AUTOINCREMENT` key) become visible in the order they were handed
out. One connection per store object, shared by the threads that call it under
a lock (calls are short; the hot path never calls the store).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from idgate.store.base import StoreUnavailable
from idgate.store.sql import INSERT_REVOCATION, SqlStateStore, schema

__all__ = ["SqliteStateStore"]

_SCHEMA = schema(real="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT")


def _wal(connection: sqlite3.Connection) -> None:
    """Put the file in WAL mode. Switching takes an exclusive lock without waiting for it, so workers
    opening a new file at once retry for a moment instead of failing with "database is locked"."""
    for _ in range(100):
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.02)
    connection.execute("PRAGMA journal_mode=WAL")


class SqliteStateStore(SqlStateStore):
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
                _wal(connection)
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

    def _transaction(self, *, write: bool, ordered: bool = False) -> AbstractContextManager[sqlite3.Connection]:
        return self._write() if write else self._read()  # every write takes the write lock: `seq` order holds

    def _insert_revocation(self, db: Any, values: tuple[Any, ...]) -> int:
        seq = db.execute(INSERT_REVOCATION, values).lastrowid  # no `RETURNING` before SQLite 3.35
        assert seq is not None
        return int(seq)

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
