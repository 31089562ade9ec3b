"""A state store on each backend: a SQLite file, and a PostgreSQL schema of its own (dropped after)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from idgate.store.base import StateStore
from idgate.store.postgres import PostgresStateStore
from idgate.store.sqlite import SqliteStateStore

PG_DSN = os.environ.get("IDGATE_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
BACKENDS = ("sqlite", "postgres")
OpenStore = Callable[[], StateStore]


def unique_schema() -> str:
    return f"idgate_state_test_{secrets.token_hex(6)}"


def drop_schema(schema: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens stores on one shared state (each call a separate handle, as another worker would have)."""
    backend: str = request.param
    schema = unique_schema()
    opened: list[StateStore] = []

    def make() -> StateStore:
        store: StateStore
        store = SqliteStateStore(tmp_path / "state.db") if backend == "sqlite" else PostgresStateStore(PG_DSN, schema)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
    if backend == "postgres":
        drop_schema(schema)


@pytest.fixture
def store(open_store: OpenStore) -> StateStore:
    return open_store()
