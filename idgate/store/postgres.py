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

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg import sql

from idgate.store.base import StoreUnavailable
from idgate.store.sql import SqlStateStore, schema

__all__ = ["PostgresStateStore"]

_LOCK_KEY = 0x1D6A7E  # the advisory lock that orders writes to the revocation log
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TABLES = schema(real="DOUBLE PRECISION", serial="BIGSERIAL PRIMARY KEY")


class PostgresStateStore(SqlStateStore):
    """`StateStore` over PostgreSQL (psycopg 3), in schema `schema`."""

    _placeholder = "%s"
    _lock_row = " FOR UPDATE"

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
    def _transaction(self, *, write: bool, ordered: bool = False) -> Iterator[psycopg.Connection[Any]]:
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

    def close(self) -> None:
        with self._lock:
            self._drop()
