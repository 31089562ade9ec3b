"""Where the audit trail is kept: SQLite (the default) or PostgreSQL, behind one interface.

A store appends a batch of records in one transaction, chaining each to the
one before it: inside the transaction it takes the write lock (SQLite `BEGIN
IMMEDIATE`; PostgreSQL `LOCK TABLE ... IN EXCLUSIVE MODE`, which readers pass),
reads the head (last `seq` and `hash`), numbers the records `seq + 1, ...`
itself (never a sequence, whose values a rolled-back transaction would skip),
links them and inserts them. So several gateway processes appending to one
trail extend one chain. Every `checkpoint_every` records, and at a clean
close, the head is signed into `audit_checkpoints`.

A record is stored as its canonical bytes (sorted-key JSON: what its hash
covers), with `request_id`, `kind`, `time` and the subject's id beside it as
indexed columns.

Retention (`prune`): records older than the cut-off are deleted up to the last
checkpoint at or before it, and that checkpoint is kept as the anchor: the
first kept record links to the hash it signs, so `idgate audit verify` still
proves the rest unaltered (`idgate.audit.verify`). Older checkpoints go too.

Reading (`chain_rows`, `checkpoint_rows`, `records`, `request_records`) is
what `verify`, `query` and `explain` use.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson

from idgate.audit.chain import GENESIS, CheckpointSigner, canonical, link

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "PostgresStore",
    "SqliteStore",
    "Store",
    "read_records",
]

DEFAULT_CHECKPOINT_EVERY = 1000

ChainRow = tuple[int, str, str, float, bytes, str | None, str | None]
"""seq, request_id, kind, time, record bytes, prev_hash, hash"""
CheckpointRow = tuple[int, int, str, str]
"""id, seq, hash, jws"""


class Store(Protocol):
    """An audit trail's storage; `open`, `append`, `close_checkpoint`, `ping`, `prune` and `close` write."""

    def open(self) -> None: ...
    def append(self, records: list[dict[str, Any]], bodies: list[bytes] | None = None) -> None:
        """Chain and insert `records` (with their canonical bytes, if known) in one transaction."""

    def close_checkpoint(self) -> None: ...
    def ping(self) -> None: ...
    def prune(self, before: float) -> int: ...
    def close(self) -> None: ...
    def chain_rows(self) -> list[ChainRow]: ...
    def checkpoint_rows(self) -> list[CheckpointRow]: ...
    def records(
        self, since: float, until: float, subject: str | None, kinds: tuple[str, ...]
    ) -> Iterator[dict[str, Any]]: ...
    def request_records(self, request_id: str) -> list[dict[str, Any]]: ...


def _rows(
    records: list[dict[str, Any]], bodies: list[bytes] | None, seq: int, prev: str
) -> tuple[list[tuple[Any, ...]], int, str]:
    """The rows to insert after head (`seq`, `prev`), and the new head.

    `bodies` are the records' canonical bytes when the caller has them already (the journal's lines).
    """
    rows = []
    for i, r in enumerate(records):
        body = bodies[i] if bodies is not None else canonical(r)
        digest = link(prev, body)
        seq += 1
        subject = r.get("subject")
        who = subject.get("id") if subject else None
        rows.append((seq, r["request_id"], r["kind"], r["time"], who, body, prev, digest))
        prev = digest
    return rows, seq, prev


# -- SQLite ------------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY,
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
CREATE TABLE IF NOT EXISTS audit_journals (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
"""


_INSERT = "INSERT INTO audit_records (seq, request_id, kind, time, subject, record, prev_hash, hash) VALUES "
_MANY = 256  # rows per statement at most (8 parameters each, well under SQLite's 32,766)
_INSERTS = {n: _INSERT + ",".join(["(?,?,?,?,?,?,?,?)"] * n) for n in (1 << b for b in range(_MANY.bit_length()))}


def _insert(connection: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert `rows` with a few multi-row statements: 256, 128, ..., 1 rows each (so each is cached).

    why: `executemany` runs one statement per row and lets go of the GIL around each; under
    load the writer's thread then waited for the event loop's thread once per row.
    """
    # a power of two: the statements come in those sizes (SQLite before 3.32 takes at most 999 parameters)
    most = 1 << (min(_MANY, connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 8).bit_length() - 1)
    start = 0
    while start < len(rows):
        size = min(most, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start : start + size]
        connection.execute(_INSERTS[size], [v for row in chunk for v in row])
        start += size


class SqliteStore:
    """A trail in one SQLite file (WAL, `synchronous=NORMAL`), shared by the workers of one machine."""

    def __init__(
        self, path: Path, *, sign: CheckpointSigner | None = None, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.path = path
        self._sign = sign
        self._checkpoint_every = checkpoint_every
        self._connection: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"sqlite:{self.path}"

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(_SQLITE_SCHEMA)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(audit_records)")}
        for column in ("prev_hash", "hash"):  # a trail written before the chain: its records stay unchained
            if column not in columns:
                try:
                    connection.execute(f"ALTER TABLE audit_records ADD COLUMN {column} TEXT")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise
        self._connection = connection

    def _writer(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("the store is not open")
        return self._connection

    def append(
        self, records: list[dict[str, Any]], bodies: list[bytes] | None = None, journals: dict[str, int] | None = None
    ) -> None:
        """Chain and insert `records`; with `journals`, also note how far into each journal file they reach."""
        if not records and not journals:
            return
        connection = self._writer()
        # INVARIANT: the head is read and extended under one write lock, so no other
        # writer appends between them.
        connection.execute("BEGIN IMMEDIATE")
        try:
            seq, prev = self._head(connection)
            rows, seq, prev = _rows(records, bodies, seq, prev)
            _insert(connection, rows)
            if journals:
                # INVARIANT: in the same transaction as the records, so a journal line is moved exactly once
                connection.executemany(
                    "INSERT INTO audit_journals (name, position) VALUES (?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                    journals.items(),
                )
            if self._sign is not None and seq - self._last_checkpoint(connection) >= self._checkpoint_every:
                self._checkpoint(connection, seq, prev)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    @staticmethod
    def _head(connection: sqlite3.Connection) -> tuple[int, str]:
        row = connection.execute("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            return row[0], row[1] or GENESIS
        # Everything pruned (or a fresh trail): continue from the anchor checkpoint, if any.
        anchor = connection.execute("SELECT seq, hash FROM audit_checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        return (0, GENESIS) if anchor is None else (anchor[0], anchor[1])

    @staticmethod
    def _last_checkpoint(connection: sqlite3.Connection) -> int:
        row = connection.execute("SELECT max(seq) FROM audit_checkpoints").fetchone()
        return int(row[0] or 0)

    def _checkpoint(self, connection: sqlite3.Connection, seq: int, digest: str) -> None:
        assert self._sign is not None
        now = time.time()
        token = self._sign({"seq": seq, "hash": digest, "time": now})
        connection.execute(
            "INSERT INTO audit_checkpoints (seq, hash, time, jws) VALUES (?, ?, ?, ?)", (seq, digest, now, token)
        )

    def close_checkpoint(self) -> None:
        """At a clean close: sign the head unless a checkpoint already covers it."""
        if self._sign is None:
            return
        connection = self._writer()
        connection.execute("BEGIN IMMEDIATE")
        try:
            seq, digest = self._head(connection)
            if seq > self._last_checkpoint(connection):
                self._checkpoint(connection, seq, digest)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def ping(self) -> None:
        self._writer().execute("SELECT 1 FROM audit_records LIMIT 0").fetchall()

    def journal_position(self, name: str) -> int:
        """How far into journal file `name` the trail reaches (0: not at all)."""
        row = self._writer().execute("SELECT position FROM audit_journals WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def forget_journals(self, gone: list[str]) -> None:
        """Drop the positions of journal files that no longer exist (names are never reused)."""
        self._writer().executemany("DELETE FROM audit_journals WHERE name = ?", [(name,) for name in gone])

    def journal_names(self) -> list[str]:
        return [row[0] for row in self._writer().execute("SELECT name FROM audit_journals")]

    def prune(self, before: float) -> int:
        """Delete records older than `before` up to the last checkpoint there, kept as the anchor; how many."""
        connection = self._writer()
        connection.execute("BEGIN IMMEDIATE")
        try:
            row = connection.execute(
                "SELECT c.seq FROM audit_checkpoints c JOIN audit_records r ON r.seq = c.seq"
                " WHERE r.time < ? ORDER BY c.seq DESC LIMIT 1",
                (before,),
            ).fetchone()
            if row is None:
                connection.execute("COMMIT")
                return 0
            anchor = row[0]
            deleted = connection.execute("DELETE FROM audit_records WHERE seq <= ?", (anchor,)).rowcount
            connection.execute("DELETE FROM audit_checkpoints WHERE seq < ?", (anchor,))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return int(deleted)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- reading (a read-only connection of its own) --

    def _reader(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise FileNotFoundError(f"no audit trail at `{self.path}`")
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)

    def chain_rows(self) -> list[ChainRow]:
        connection = self._reader()
        try:
            return connection.execute(
                "SELECT seq, request_id, kind, time, record, prev_hash, hash FROM audit_records ORDER BY seq"
            ).fetchall()
        finally:
            connection.close()

    def journal_positions(self) -> dict[str, int]:
        """How far into each commit journal file the trail reaches (read only)."""
        connection = self._reader()
        try:
            return {
                name: int(position)
                for name, position in connection.execute("SELECT name, position FROM audit_journals")
            }
        except sqlite3.OperationalError:  # a trail from before the journal
            return {}
        finally:
            connection.close()

    def checkpoint_rows(self) -> list[CheckpointRow]:
        connection = self._reader()
        try:
            return connection.execute("SELECT id, seq, hash, jws FROM audit_checkpoints ORDER BY id").fetchall()
        finally:
            connection.close()

    def records(
        self, since: float, until: float, subject: str | None, kinds: tuple[str, ...]
    ) -> Iterator[dict[str, Any]]:
        """Records of `kinds` in [since, until] (of `subject`, if given), newest first."""
        sql = (
            "SELECT record FROM audit_records WHERE kind IN (SELECT value FROM json_each(?))"
            " AND time >= ? AND time <= ? AND (? IS NULL OR subject = ?) ORDER BY time DESC, seq DESC"
        )
        connection = self._reader()
        try:
            for (body,) in connection.execute(sql, (orjson.dumps(kinds).decode(), since, until, subject, subject)):
                yield orjson.loads(body)
        finally:
            connection.close()

    def request_records(self, request_id: str) -> list[dict[str, Any]]:
        connection = self._reader()
        try:
            rows = connection.execute(
                "SELECT record FROM audit_records WHERE request_id = ? ORDER BY seq", (request_id,)
            ).fetchall()
        finally:
            connection.close()
        return [orjson.loads(row[0]) for row in rows]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a SQLite trail, oldest first (for tests)."""
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute("SELECT record FROM audit_records ORDER BY seq").fetchall()
    finally:
        connection.close()
    return [orjson.loads(row[0]) for row in rows]


# -- PostgreSQL --------------------------------------------------------------------------------


def _pg_schema(schema: str) -> str:
    return f"""
CREATE SCHEMA IF NOT EXISTS "{schema}";
CREATE TABLE IF NOT EXISTS "{schema}".audit_records (
    seq BIGINT PRIMARY KEY,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    subject TEXT,
    record BYTEA NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_records_request ON "{schema}".audit_records (request_id);
CREATE INDEX IF NOT EXISTS audit_records_time ON "{schema}".audit_records (time);
CREATE TABLE IF NOT EXISTS "{schema}".audit_checkpoints (
    id BIGSERIAL PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    jws TEXT NOT NULL
);
"""


class PostgresStore:
    """A trail in PostgreSQL (schema `schema`), shared by every gateway replica."""

    def __init__(
        self,
        dsn: str,
        schema: str = "idgate_audit",
        *,
        sign: CheckpointSigner | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        if not schema.replace("_", "").isalnum():
            raise ValueError("the schema name must be letters, digits and `_`")
        self._dsn = dsn
        self.schema = schema
        self._sign = sign
        self._checkpoint_every = checkpoint_every
        self._connection: Any = None

    def _sql(self, text: str) -> str:
        """`text` with `@records` / `@checkpoints` naming this store's tables.

        The schema name was checked to be letters, digits and `_` (and is quoted),
        so it cannot change the statement; every value goes as a parameter.
        """
        return text.replace("@records", f'"{self.schema}".audit_records').replace(
            "@checkpoints", f'"{self.schema}".audit_checkpoints'
        )

    def __repr__(self) -> str:
        return f"postgres schema {self.schema}"  # never the DSN: it may hold a password

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self._dsn, connect_timeout=5)

    def open(self) -> None:
        connection = self._connect()
        try:
            with connection.transaction():
                # why: two processes creating the schema at once would race on the catalog
                connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.schema,))
                connection.execute(_pg_schema(self.schema))
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _writer(self) -> Any:
        if self._connection is None or self._connection.closed:
            if self._connection is not None:  # lost: reconnect (the store may be back)
                self._connection = self._connect()
            else:
                raise RuntimeError("the store is not open")
        return self._connection

    def _head(self, connection: Any) -> tuple[int, str]:
        row = connection.execute(self._sql("SELECT seq, hash FROM @records ORDER BY seq DESC LIMIT 1")).fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
        anchor = connection.execute(
            self._sql("SELECT seq, hash FROM @checkpoints ORDER BY seq DESC LIMIT 1")
        ).fetchone()
        return (0, GENESIS) if anchor is None else (int(anchor[0]), str(anchor[1]))

    def _last_checkpoint(self, connection: Any) -> int:
        row = connection.execute(self._sql("SELECT max(seq) FROM @checkpoints")).fetchone()
        return int(row[0] or 0)

    def _checkpoint(self, connection: Any, seq: int, digest: str) -> None:
        assert self._sign is not None
        now = time.time()
        token = self._sign({"seq": seq, "hash": digest, "time": now})
        connection.execute(
            self._sql("INSERT INTO @checkpoints (seq, hash, time, jws) VALUES (%s, %s, %s, %s)"),
            (seq, digest, now, token),
        )

    def append(self, records: list[dict[str, Any]], bodies: list[bytes] | None = None) -> None:
        if not records:
            return
        connection = self._writer()
        try:
            with connection.transaction():
                # INVARIANT: one writer at a time extends the chain; readers are not blocked.
                connection.execute(self._sql("LOCK TABLE @records IN EXCLUSIVE MODE"))
                seq, prev = self._head(connection)
                rows, seq, prev = _rows(records, bodies, seq, prev)
                with connection.cursor() as cursor:
                    cursor.executemany(
                        self._sql(
                            "INSERT INTO @records"
                            " (seq, request_id, kind, time, subject, record, prev_hash, hash)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                        ),
                        rows,
                    )
                if self._sign is not None and seq - self._last_checkpoint(connection) >= self._checkpoint_every:
                    self._checkpoint(connection, seq, prev)
        except BaseException:
            if connection.closed or connection.broken:
                self._connection = self._connect_quietly()
            raise

    def _connect_quietly(self) -> Any:
        try:
            return self._connect()
        except Exception:  # noqa: BLE001 - still down: the next try reconnects
            return None

    def close_checkpoint(self) -> None:
        if self._sign is None:
            return
        connection = self._writer()
        with connection.transaction():
            connection.execute(self._sql("LOCK TABLE @records IN EXCLUSIVE MODE"))
            seq, digest = self._head(connection)
            if seq > self._last_checkpoint(connection):
                self._checkpoint(connection, seq, digest)

    def ping(self) -> None:
        if self._connection is None or self._connection.closed or self._connection.broken:
            self._connection = self._connect()
        with self._connection.transaction():
            self._connection.execute(self._sql("SELECT 1 FROM @records LIMIT 0"))

    def prune(self, before: float) -> int:
        connection = self._writer()
        with connection.transaction():
            connection.execute(self._sql("LOCK TABLE @records IN EXCLUSIVE MODE"))
            row = connection.execute(
                self._sql(
                    "SELECT c.seq FROM @checkpoints c JOIN @records r ON r.seq = c.seq"
                    " WHERE r.time < %s ORDER BY c.seq DESC LIMIT 1"
                ),
                (before,),
            ).fetchone()
            if row is None:
                return 0
            anchor = int(row[0])
            deleted = connection.execute(self._sql("DELETE FROM @records WHERE seq <= %s"), (anchor,)).rowcount
            connection.execute(self._sql("DELETE FROM @checkpoints WHERE seq < %s"), (anchor,))
        return int(deleted)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def drop(self) -> None:
        """Remove the whole trail (tests)."""
        connection = self._connect()
        try:
            with connection.transaction():
                connection.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            connection.close()

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        connection = self._connect()
        try:
            rows: list[tuple[Any, ...]] = connection.execute(sql, params).fetchall()
            return rows
        finally:
            connection.close()

    def chain_rows(self) -> list[ChainRow]:
        rows = self._read(
            self._sql("SELECT seq, request_id, kind, time, record, prev_hash, hash FROM @records ORDER BY seq")
        )
        return [(int(r[0]), r[1], r[2], r[3], bytes(r[4]), r[5], r[6]) for r in rows]

    def checkpoint_rows(self) -> list[CheckpointRow]:
        rows = self._read(self._sql("SELECT id, seq, hash, jws FROM @checkpoints ORDER BY id"))
        return [(int(r[0]), int(r[1]), r[2], r[3]) for r in rows]

    def records(
        self, since: float, until: float, subject: str | None, kinds: tuple[str, ...]
    ) -> Iterator[dict[str, Any]]:
        rows = self._read(
            self._sql(
                "SELECT record FROM @records WHERE kind = ANY(%s) AND time >= %s AND time <= %s"
                " AND (%s::text IS NULL OR subject = %s) ORDER BY time DESC, seq DESC"
            ),
            (list(kinds), since, until, subject, subject),
        )
        for (body,) in rows:
            yield orjson.loads(bytes(body))

    def request_records(self, request_id: str) -> list[dict[str, Any]]:
        rows = self._read(self._sql("SELECT record FROM @records WHERE request_id = %s ORDER BY seq"), (request_id,))
        return [orjson.loads(bytes(r[0])) for r in rows]
