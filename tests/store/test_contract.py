"""One contract for every state store backend (SQLite, PostgreSQL): tasks, the revocation log, replay keys."""

from __future__ import annotations

import threading
import time

from idgate.store.base import Revocation, StateStore, Task
from tests.store.conftest import OpenStore


def a_task(task_id: str = "task_1", *, expires_in: float = 600, scope: tuple[str, ...] | None = ("chat",)) -> Task:
    now = time.time()
    return Task(
        id=task_id,
        subject="alice",
        subject_issuer="https://id.example",
        owner_actors=("agent-7",),
        tenant="acme",
        purpose="refund order 42",
        scope=scope,
        created_at=now,
        expires_at=now + expires_in,
    )


def test_a_task_is_kept_as_given(store: StateStore) -> None:
    task = a_task()
    store.create_task(task)
    assert store.get_task("task_1") == task
    assert store.get_task("task_missing") is None
    unscoped = a_task("task_2", scope=None)
    store.create_task(unscoped)
    assert store.get_task("task_2") == unscoped
    assert task.status(time.time()) == "active"
    assert task.status(task.expires_at) == "expired"


def test_completing_a_task_logs_its_revocation_once(store: StateStore) -> None:
    task = a_task()
    store.create_task(task)
    now = time.time()
    done = store.complete_task("task_1", "human:alice", now, now + 100)
    assert done is not None and done.completed_at == now and done.completed_by == "human:alice"
    assert done.status(now) == "completed"
    assert store.get_task("task_1") == done
    (entry,) = store.changes(0, now)
    assert (entry.kind, entry.value, entry.by) == ("task", "task_1", "human:alice")
    assert entry.until >= task.expires_at  # kept at least as long as a token of the task could live
    # Completing again changes nothing and logs nothing more.
    again = store.complete_task("task_1", "human:bob", now + 1, now + 200)
    assert again == done
    assert store.changes(entry.seq, now) == []
    assert store.complete_task("task_missing", "human:alice", now, now + 100) is None


def test_the_log_is_read_by_sequence_from_any_handle(open_store: OpenStore) -> None:
    writer, reader = open_store(), open_store()  # e.g. two workers
    now = time.time()
    first = writer.revoke("token", "jti-1", issuer=None, at=now, until=now + 60, reason="r", by="holder")
    second = writer.revoke("session", "sid-9", issuer="https://id.example", at=now, until=now + 60, reason="r", by="x")
    third = writer.revoke("agent", "agent-7", issuer=None, at=now, until=now + 60, reason="kill", by="human:root")
    assert first.seq < second.seq < third.seq
    assert reader.head() == third.seq
    assert reader.changes(0, now) == [first, second, third]
    assert reader.changes(first.seq, now) == [second, third]
    assert reader.changes(third.seq, now) == []
    assert reader.changes(0, now, limit=1) == [first]
    assert second.issuer == "https://id.example" and isinstance(second, Revocation)


def test_entries_past_their_until_are_not_read_and_can_be_forgotten(store: StateStore) -> None:
    now = time.time()
    old = store.revoke("token", "old", issuer=None, at=now - 100, until=now - 1, reason="r", by="b")
    new = store.revoke("tenant", "beta", issuer=None, at=now, until=now + 60, reason="r", by="b")
    assert store.changes(0, now) == [new]
    assert store.forget(now) == 1
    assert store.changes(0, now - 50) == [new]
    # Sequence numbers are never handed out again, even after forgetting.
    newer = store.revoke("token", "x", issuer=None, at=now, until=now + 60, reason="r", by="b")
    assert newer.seq > new.seq > old.seq


def test_once_remembers_a_key_across_handles(open_store: OpenStore) -> None:
    one, other = open_store(), open_store()
    until = time.time() + 60
    assert one.once("logout", "iss jti-1", until) is True
    assert other.once("logout", "iss jti-1", until) is False  # a replay, seen by another worker
    assert other.once("ssf", "iss jti-1", until) is True  # namespaces are separate
    assert one.forget(until + 1) == 2
    assert one.once("logout", "iss jti-1", until + 60) is True


def test_concurrent_writers_never_let_a_reader_skip_an_entry(open_store: OpenStore) -> None:
    """Sequence numbers become visible in order: a reader polling `changes(last seq)` sees every entry."""
    writers = [open_store() for _ in range(3)]
    reader = open_store()
    now = time.time()
    per_writer = 25
    seen: list[int] = []
    done = threading.Event()

    def write(store: StateStore, name: str) -> None:
        for i in range(per_writer):
            store.revoke("token", f"{name}-{i}", issuer=None, at=now, until=now + 600, reason="r", by=name)

    def read() -> None:
        last = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            finished = done.is_set()
            for entry in reader.changes(last, now):
                seen.append(entry.seq)
                last = entry.seq
            if finished:
                return

    threads = [threading.Thread(target=write, args=(w, f"w{i}")) for i, w in enumerate(writers)]
    poller = threading.Thread(target=read)
    poller.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    done.set()
    poller.join(30)
    assert len(seen) == 3 * per_writer
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
