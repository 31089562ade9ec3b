"""A state store on each backend: a SQLite file, and a PostgreSQL schema of its own (dropped after)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from idgate.store.base import StateStore
from idgate.store.postgres import PostgresStateStore
from idgate.store.sqlite import SqliteStateStore
from tests.support import PG_DSN, drop_schema, unique_schema

BACKENDS = ("sqlite", "postgres")
OpenStore = Callable[[], StateStore]


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens stores on one shared state (each call a separate handle, as another worker would have)."""
    backend: str = request.param
    schema = unique_schema("idgate_state_test")
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
