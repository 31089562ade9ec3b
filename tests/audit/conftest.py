"""Fixtures of the audit tests: a trail on each backend (SQLite file; PostgreSQL schema, dropped after)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from idgate.audit.chain import CheckpointSigner, checkpoint_signer
from idgate.audit.stores import PostgresStore, SqliteStore, Store
from idgate.sts.keys import SigningKeys
from tests.support import PG_DSN, drop_schema, unique_schema

BACKENDS = ("sqlite", "postgres")

MakeStore = Callable[..., Store]


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys.open(tmp_path / "keys")


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path, keys: SigningKeys) -> Iterator[MakeStore]:
    """`make_store(checkpoint_every=N)`: a new handle on one trail (several handles: several writers)."""
    backend: str = request.param
    schema = unique_schema("idgate_audit_test")
    made: list[Store] = []

    def make(checkpoint_every: int = 1000, sign: CheckpointSigner | None = None) -> Store:
        signer = sign if sign is not None else checkpoint_signer(keys)
        store: Store
        if backend == "sqlite":
            store = SqliteStore(tmp_path / "audit.db", sign=signer, checkpoint_every=checkpoint_every)
        else:
            store = PostgresStore(PG_DSN, schema, sign=signer, checkpoint_every=checkpoint_every)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
    if backend == "postgres":
        drop_schema(schema)
