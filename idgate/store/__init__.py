"""The state store: tasks and the revocation log, shared by every worker and replica.

`open_state_store(config)` picks the backend from `state.backend`: SQLite in the
state folder (`STATE/state.db`, the single-machine default) or PostgreSQL
(`state.postgres_dsn`). The interface and its types are in `idgate.store.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from idgate.store.base import (
    REVOCATION_KINDS,
    Counter,
    Revocation,
    RevocationKind,
    StateStore,
    StoreUnavailable,
    Task,
)

if TYPE_CHECKING:
    from idgate.config import Config

__all__ = [
    "REVOCATION_KINDS",
    "STATE_FILE",
    "Counter",
    "Revocation",
    "RevocationKind",
    "StateStore",
    "StoreUnavailable",
    "Task",
    "open_state_store",
]

STATE_FILE = "state.db"


def open_state_store(config: Config) -> StateStore:
    """The configured backend; nothing is connected until first use (an unreachable store fails calls, not start-up)."""
    state = config.state
    if state.backend == "postgres":
        from idgate.store.postgres import PostgresStateStore

        assert state.postgres_dsn is not None  # the config requires it
        dsn = state.postgres_dsn if isinstance(state.postgres_dsn, str) else config.reveal(state.postgres_dsn)
        return PostgresStateStore(dsn, state.postgres_schema)
    from idgate.store.sqlite import SqliteStateStore

    return SqliteStateStore(config.home / STATE_FILE)
