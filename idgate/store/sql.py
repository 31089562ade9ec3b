"""The state store in SQL: the tables and queries the SQLite and PostgreSQL backends share.

Both keep the same four tables (`tasks`, `revocations`, `seen_once`, `counters`) and run the
same statements; a backend supplies only what differs: how it connects, how a
transaction is opened (and how writes to the revocation log are put in `seq`
order), its placeholder style, and its column types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import orjson

from idgate.store.base import Counter, Revocation, RevocationKind, Task

__all__ = ["INSERT_REVOCATION", "SqlStateStore", "revocation_from_row", "schema", "task_from_row", "task_row"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    subject_issuer TEXT NOT NULL,
    owner_actors TEXT NOT NULL,
    tenant TEXT,
    purpose TEXT NOT NULL,
    scope TEXT,
    created_at {real} NOT NULL,
    expires_at {real} NOT NULL,
    completed_at {real},
    completed_by TEXT
);
CREATE TABLE IF NOT EXISTS revocations (
    seq {serial},
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    issuer TEXT,
    at {real} NOT NULL,
    until {real} NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS revocations_until ON revocations (until);
CREATE TABLE IF NOT EXISTS seen_once (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    until {real} NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    count BIGINT NOT NULL,
    until {real} NOT NULL
);
"""

_TASK_COLUMNS = (
    "id, subject, subject_issuer, owner_actors, tenant, purpose, scope, created_at, expires_at, completed_at, "
    "completed_by"
)
_REVOCATION_COLUMNS = "seq, kind, value, issuer, at, until, reason, by"
INSERT_REVOCATION = "INSERT INTO revocations (kind, value, issuer, at, until, reason, by) VALUES (?,?,?,?,?,?,?)"


def schema(*, real: str, serial: str) -> str:
    """The tables, with the backend's type of a float column and of the auto-numbered `seq` key."""
    return _SCHEMA.format(real=real, serial=serial)


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


class SqlStateStore:
    """`StateStore` over a DB-API connection; subclasses open it and its transactions.

    `_transaction(write=..., ordered=...)` yields a connection inside one transaction
    (turning the driver's errors into `StoreUnavailable`): `write` for statements that
    change something, `ordered` for those that add to or prune the revocation log,
    whose `seq` values must commit in the order they were handed out.
    """

    _placeholder = "?"
    _lock_row = ""  # what makes a read lock the row it read until the transaction ends, where needed

    def _transaction(self, *, write: bool, ordered: bool = False) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        return statement if self._placeholder == "?" else statement.replace("?", self._placeholder)

    def _insert_revocation(self, db: Any, values: tuple[Any, ...]) -> int:
        """Add one entry to the revocation log; its `seq`."""
        row = db.execute(self._sql(INSERT_REVOCATION + " RETURNING seq"), values).fetchone()
        assert row is not None
        return int(row[0])

    def create_task(self, task: Task) -> None:
        with self._transaction(write=True) as db:
            db.execute(self._sql(f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"), task_row(task))  # noqa: S608

    def get_task(self, task_id: str) -> Task | None:
        with self._transaction(write=False) as db:
            row = db.execute(self._sql(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?"), (task_id,)).fetchone()  # noqa: S608
        return None if row is None else task_from_row(row)

    def complete_task(self, task_id: str, by: str, at: float, until: float) -> Task | None:
        with self._transaction(write=True, ordered=True) as db:
            query = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?{self._lock_row}"  # noqa: S608
            row = db.execute(self._sql(query), (task_id,)).fetchone()
            if row is None:
                return None
            task = task_from_row(row)
            if task.completed_at is not None:
                return task
            db.execute(self._sql("UPDATE tasks SET completed_at = ?, completed_by = ? WHERE id = ?"), (at, by, task_id))
            self._insert_revocation(db, ("task", task_id, None, at, max(until, task.expires_at), "task completed", by))
        return dataclasses.replace(task, completed_at=at, completed_by=by)

    def revoke(
        self, kind: RevocationKind, value: str, *, issuer: str | None, at: float, until: float, reason: str, by: str
    ) -> Revocation:
        with self._transaction(write=True, ordered=True) as db:
            seq = self._insert_revocation(db, (kind, value, issuer, at, until, reason, by))
        return Revocation(seq, kind, value, issuer, at, until, reason, by)

    def changes(self, since: int, now: float, limit: int = 10_000) -> list[Revocation]:
        query = f"SELECT {_REVOCATION_COLUMNS} FROM revocations WHERE seq > ? AND until > ? ORDER BY seq LIMIT ?"  # noqa: S608
        with self._transaction(write=False) as db:
            rows = db.execute(self._sql(query), (since, now, limit)).fetchall()
        return [revocation_from_row(row) for row in rows]

    def head(self) -> int:
        with self._transaction(write=False) as db:
            row = db.execute("SELECT coalesce(max(seq), 0) FROM revocations").fetchone()
        assert row is not None
        return int(row[0])

    def once(self, namespace: str, key: str, until: float) -> bool:
        statement = "INSERT INTO seen_once (namespace, key, until) VALUES (?,?,?) ON CONFLICT DO NOTHING"
        with self._transaction(write=True) as db:
            return bool(db.execute(self._sql(statement), (namespace, key, until)).rowcount == 1)

    def count_up(self, counters: Sequence[Counter], now: float) -> tuple[bool, tuple[int, ...]]:
        # Rows are created first, then read with a row lock (PostgreSQL; SQLite holds its write lock), in key
        # order so that two transactions on the same counters never wait on each other in a circle.
        order = sorted(range(len(counters)), key=lambda i: counters[i].key)
        found: dict[int, tuple[int, float]] = {}
        with self._transaction(write=True) as db:
            for i in order:
                counter = counters[i]
                create = "INSERT INTO counters (key, count, until) VALUES (?, 0, ?) ON CONFLICT DO NOTHING"
                db.execute(self._sql(create), (counter.key, counter.until))
                query = f"SELECT count, until FROM counters WHERE key = ?{self._lock_row}"  # noqa: S608
                row = db.execute(self._sql(query), (counter.key,)).fetchone()
                assert row is not None
                count, until = (int(row[0]), float(row[1])) if float(row[1]) > now else (0, 0.0)
                found[i] = (count, until)
            counts = tuple(found[i][0] for i in range(len(counters)))
            if any(count >= counter.limit for count, counter in zip(counts, counters, strict=True)):
                return False, counts
            update = "UPDATE counters SET count = ?, until = ? WHERE key = ?"
            for i in order:
                counter = counters[i]
                db.execute(self._sql(update), (found[i][0] + 1, max(found[i][1], counter.until), counter.key))
        return True, tuple(count + 1 for count in counts)

    def forget(self, now: float) -> int:
        with self._transaction(write=True, ordered=True) as db:
            gone = int(db.execute(self._sql("DELETE FROM revocations WHERE until <= ?"), (now,)).rowcount)
            gone += int(db.execute(self._sql("DELETE FROM seen_once WHERE until <= ?"), (now,)).rowcount)
            gone += int(db.execute(self._sql("DELETE FROM counters WHERE until <= ?"), (now,)).rowcount)
        return gone
