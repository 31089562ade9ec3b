"""A replay cache: has this one-time value (a DPoP proof's or a client assertion's `jti`) been seen?

A proof or assertion is single-use: the first presentation wins, every later
one is a replay, on any worker. Two levels:

1. an in-process dict, so a replay to the same worker is refused without I/O;
2. a SQLite table in the state folder (`STATE/replay.db`, WAL), shared by every
   worker on the machine: `INSERT` with the value's hash as primary key either
   adds the row (first use) or fails on the conflict (seen before). The insert
   is its own short transaction, so two workers racing on one value cannot both win.

Each entry carries its expiry (after which the value would be refused anyway,
for its age): expired rows are deleted now and then, and an expired row does
not block a value, so the table stays as small as the traffic of one window.
Only a SHA-256 of the namespace and value is stored, never the value.

Past one machine the second level is Redis (`sts.replay_cache.backend: redis`):
`SET key 1 NX PXAT expiry` is the same first-writer-wins insert, for every
replica. SQLite is the single-machine default (DESIGN.md, "Scale"). Any error
of the store, a timeout included, is a `ServiceUnavailable`: a value that
cannot be checked is refused.

A Redis with a password is reached with a URL given as a secret
(`redis_url: {env: NAME}` or `{file: PATH}`), revealed once when the cache is
built; the URL is never logged. Like the other stores, nothing is connected
until first use: an unreachable Redis, or one that refuses the password, fails
each check (503, and an error in the log naming the cause), not the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError

from idgate.errors import ConfigError, ServiceUnavailable
from idgate.secretref import SecretRef
from idgate.sts.settings import ReplayCacheSettings, redis_url_problem

__all__ = [
    "REPLAY_FILE",
    "MemoryReplayCache",
    "RedisReplayCache",
    "ReplayCache",
    "SqliteReplayCache",
    "build_replay_cache",
]

log = logging.getLogger("idgate.identity")

REPLAY_FILE = "replay.db"
_PRUNE_EVERY = 30.0  # seconds between deletions of expired rows


class ReplayCache(Protocol):
    """`first_use` is True the first time a (namespace, value) is offered before `expires_at`, then False."""

    async def first_use(self, namespace: str, value: str, expires_at: float) -> bool: ...

    async def close(self) -> None: ...


def _key(namespace: str, value: str) -> bytes:
    return hashlib.sha256(f"{namespace}\0{value}".encode()).digest()[:20]


class MemoryReplayCache:
    """The first level alone: one process. Also the in-process front of `SqliteReplayCache`."""

    def __init__(self, max_entries: int = 200_000, clock: Callable[[], float] = time.time) -> None:
        self._seen: dict[bytes, float] = {}
        self._max = max_entries
        self._clock = clock

    async def first_use(self, namespace: str, value: str, expires_at: float) -> bool:
        key = _key(namespace, value)
        if self.seen(key):
            return False
        self.add(key, expires_at)
        return True

    async def close(self) -> None:
        self._seen.clear()

    def seen(self, key: bytes) -> bool:
        expires = self._seen.get(key)
        return expires is not None and expires >= self._clock()

    def add(self, key: bytes, expires_at: float) -> None:
        if len(self._seen) >= self._max:
            now = self._clock()
            for old in [k for k, exp in self._seen.items() if exp < now]:
                del self._seen[old]
            # Still full: forget the oldest. Only safe with a second level behind it,
            # or with a size larger than one window's traffic (the default is).
            while len(self._seen) >= self._max:
                del self._seen[next(iter(self._seen))]
        self._seen[key] = expires_at


class SqliteReplayCache:
    """Shared by every worker using the state folder; see the module docstring."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, busy_timeout_ms: int = 2000) -> None:
        self.path = path
        self._clock = clock
        self._memory = MemoryReplayCache(clock=clock)
        self._lock = threading.Lock()
        self._busy_ms = busy_timeout_ms
        self._db: sqlite3.Connection | None = None
        self._pruned_at = 0.0

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_ms)}")
            db.execute("PRAGMA journal_mode = WAL")
            # No fsync, ever (not even at checkpoints, which would stall the event loop): a crashed process
            # loses nothing; a crashed machine may lose or corrupt the file, which is then started afresh.
            db.execute("PRAGMA synchronous = OFF")
            db.execute("CREATE TABLE IF NOT EXISTS seen (key BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID")
            self._db = db
        return self._db

    async def first_use(self, namespace: str, value: str, expires_at: float) -> bool:
        # Inline, not in a thread: one short insert (tens of µs) costs less than a thread hop.
        key = _key(namespace, value)
        if self._memory.seen(key):
            return False
        now = self._clock()
        with self._lock:
            try:
                db = self._connect()
                # A row whose value has expired no longer blocks it; a live one does.
                cursor = db.execute(
                    "INSERT INTO seen (key, expires) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET expires = excluded.expires WHERE seen.expires < ?",
                    (key, expires_at, now),
                )
                first = cursor.rowcount == 1
                if now - self._pruned_at > _PRUNE_EVERY:
                    self._pruned_at = now
                    db.execute("DELETE FROM seen WHERE expires < ?", (now,))
            except sqlite3.Error as exc:
                log.warning("replay cache %s cannot answer: %s", self.path, exc)
                self.close_quietly()
                if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                    self._start_afresh()
                raise ServiceUnavailable("the replay cache cannot answer right now") from None
        self._memory.add(key, expires_at)
        return first

    def _start_afresh(self) -> None:
        """Move a damaged file aside; the next call makes a new one (this one was refused)."""
        with contextlib.suppress(OSError):
            self.path.rename(self.path.with_name(f"{self.path.name}.damaged-{int(self._clock())}"))
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            log.warning("replay cache %s was damaged: moved aside, starting afresh", self.path)

    def close_quietly(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):  # closing a broken connection
                self._db.close()
            self._db = None

    async def close(self) -> None:
        with self._lock:
            self.close_quietly()


class RedisReplayCache:
    """The second level on Redis, shared by every replica: `SET NX` with the value's expiry."""

    def __init__(
        self, url: str, *, prefix: str = "idgate:replay:", timeout: float = 0.5, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._prefix = prefix.encode()
        self._memory = MemoryReplayCache(clock=clock)
        self._timeout = timeout
        self._clock = clock

    async def first_use(self, namespace: str, value: str, expires_at: float) -> bool:
        key = _key(namespace, value)
        if self._memory.seen(key):
            return False
        expires_ms = max(int(expires_at * 1000), int(self._clock() * 1000) + 1)
        try:
            async with asyncio.timeout(self._timeout):
                first = await self._redis.set(self._prefix + key.hex().encode(), b"1", nx=True, pxat=expires_ms)
        except AuthenticationError as exc:
            # why: not a passing outage but a configuration to fix; say so (never with the URL or the message).
            log.error(
                "replay cache on Redis: the server refused the credentials of `sts.replay_cache.redis_url` (%s);"
                " every DPoP proof and client assertion is refused until they are fixed",
                type(exc).__name__,
            )
            raise ServiceUnavailable("the replay cache cannot answer right now") from None
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("replay cache on Redis cannot answer: %s", type(exc).__name__)
            raise ServiceUnavailable("the replay cache cannot answer right now") from None
        self._memory.add(key, expires_at)
        return bool(first)

    async def close(self) -> None:
        await self._redis.aclose()


def build_replay_cache(settings: ReplayCacheSettings, home: Path, reveal: Callable[[SecretRef], str]) -> ReplayCache:
    """The configured replay cache: SQLite in the state folder, or Redis (its URL revealed with `reveal`)."""
    if settings.backend == "redis":
        assert settings.redis_url is not None  # the settings require it
        url = settings.redis_url
        if isinstance(url, SecretRef):
            url = reveal(url)  # a missing secret is a ConfigError: the gateway does not start
            problem = redis_url_problem(url, secret=True)
            if problem:
                raise ConfigError([f"sts.replay_cache.redis_url: {problem}"])
        return RedisReplayCache(url, prefix=settings.redis_prefix)
    return SqliteReplayCache(home / REPLAY_FILE)
