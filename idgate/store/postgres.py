"""The state store in PostgreSQL: what gateway replicas on several machines share.

The same tables as the SQLite store, in a schema of their own (`state.postgres_schema`,
created if missing). Writers of the revocation log first take a transaction-scoped
advisory lock, so `seq` values (a sequence, which hands out numbers outside
transactions) commit in the order they were taken: a reader that has seen `seq` N
never later finds a smaller one appear.

One connection per store object, used under a lock by the threads that call it;
a broken connection is dropped and reopened on the next call (each failure is a
`StoreUnavailable`, so callers fail closed meanwhile).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg import sql

from idgate.store.base import Revocation, RevocationKind, StoreUnavailable, Task
from idgate.store.sqlite import revocation_from_row, task_from_row, task_row

__all__ = ["PostgresStateStore"]

_LOCK_KEY = 0x1D6A7E  # the advisory lock that orders writes to the revocation log
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_TABLES = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    subject_issuer TEXT NOT NULL,
    owner_actors TEXT NOT NULL,
    tenant TEXT,
    purpose TEXT NOT NULL,
    scope TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    completed_at DOUBLE PRECISION,
    completed_by TEXT
);
CREATE TABLE IF NOT EXISTS revocations (
    seq BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    issuer TEXT,
    at DOUBLE PRECISION NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS revocations_until ON revocations (until);
CREATE TABLE IF NOT EXISTS seen_once (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""

_TASK_COLUMNS = (
    "id, subject, subject_issuer, owner_actors, tenant, purpose, scope, created_at, expires_at, completed_at, "
    "completed_by"
)
_REVOCATION_COLUMNS = "seq, kind, value, issuer, at, until, reason, by"
_INSERT_REVOCATION = (
    "INSERT INTO revocations (kind, value, issuer, at, until, reason, by) VALUES (%s,%s,%s,%s,%s,%s,%s) RETURNING seq"
)


class PostgresStateStore:
    """`StateStore` over PostgreSQL (psycopg 3), in schema `schema`."""

    def __init__(self, dsn: str, schema: str = "idgate", connect_timeout: float = 2.0) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"schema `{schema}` must be a lowercase SQL identifier")
        self._dsn = dsn
        self.schema = schema
        self._timeout = connect_timeout
        self._lock = threading.Lock()
        self._connection: psycopg.Connection[Any] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.closed:
            # Keepalives and a TCP user timeout: a silent network partition fails a call within
            # seconds (callers then fail closed) instead of hanging the thread that waits on it.
            connection = psycopg.connect(
                self._dsn,
                connect_timeout=max(1, int(self._timeout)),
                autocommit=False,
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=2,
                tcp_user_timeout=5000,
            )
            try:
                with connection.transaction():
                    connection.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))  # one creator at a time
                    connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                    connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
                    connection.execute(_TABLES)
                connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
                connection.commit()
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        return self._connection

    @contextmanager
    def _transaction(self, ordered: bool = False) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            try:
                connection = self._connect()
                with connection.transaction():
                    if ordered:
                        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    yield connection
            except psycopg.Error as exc:
                self._drop()
                raise StoreUnavailable(f"state store (PostgreSQL): {type(exc).__name__}: {str(exc)[:200]}") from None

    def _drop(self) -> None:
        if self._connection is not None:
            with suppress(psycopg.Error):
                self._connection.close()
            self._connection = None

    def create_task(self, task: Task) -> None:
        with self._transaction() as db:
            db.execute(f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", task_row(task))  # noqa: S608

    def get_task(self, task_id: str) -> Task | None:
        with self._transaction() as db:
            row = db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = %s", (task_id,)).fetchone()  # noqa: S608
        return None if row is None else task_from_row(row)

    def complete_task(self, task_id: str, by: str, at: float, until: float) -> Task | None:
        with self._transaction(ordered=True) as db:
            row = db.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = %s FOR UPDATE",  # noqa: S608
                (task_id,),
            ).fetchone()
            if row is None:
                return None
            task = task_from_row(row)
            if task.completed_at is not None:
                return task
            db.execute("UPDATE tasks SET completed_at = %s, completed_by = %s WHERE id = %s", (at, by, task_id))
            db.execute(
                _INSERT_REVOCATION, ("task", task_id, None, at, max(until, task.expires_at), "task completed", by)
            )
        return dataclasses.replace(task, completed_at=at, completed_by=by)

    def revoke(
        self, kind: RevocationKind, value: str, *, issuer: str | None, at: float, until: float, reason: str, by: str
    ) -> Revocation:
        with self._transaction(ordered=True) as db:
            row = db.execute(_INSERT_REVOCATION, (kind, value, issuer, at, until, reason, by)).fetchone()
        assert row is not None
        return Revocation(int(row[0]), kind, value, issuer, at, until, reason, by)

    def changes(self, since: int, now: float, limit: int = 10_000) -> list[Revocation]:
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {_REVOCATION_COLUMNS} FROM revocations WHERE seq > %s AND until > %s ORDER BY seq LIMIT %s",  # noqa: S608
                (since, now, limit),
            ).fetchall()
        return [revocation_from_row(row) for row in rows]

    def head(self) -> int:
        with self._transaction() as db:
            row = db.execute("SELECT coalesce(max(seq), 0) FROM revocations").fetchone()
        assert row is not None
        return int(row[0])

    def once(self, namespace: str, key: str, until: float) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO seen_once (namespace, key, until) VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
                (namespace, key, until),
            )
            return cursor.rowcount == 1

    def forget(self, now: float) -> int:
        with self._transaction(ordered=True) as db:
            gone = db.execute("DELETE FROM revocations WHERE until <= %s", (now,)).rowcount
            gone += db.execute("DELETE FROM seen_once WHERE until <= %s", (now,)).rowcount
        return gone

    def close(self) -> None:
        with self._lock:
            self._drop()
