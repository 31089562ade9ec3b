"""The commit journal of a SQLite trail: durable at once, moved into the chain exactly once, left-overs recovered."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from idgate.audit.journal import journal_folder, left_over
from idgate.audit.stores import SqliteStore
from idgate.audit.verify import verify
from idgate.audit.writer import AuditWriter
from idgate.errors import ServiceUnavailable
from tests.audit.test_stores import request
from tests.support import wait_for

# A process that commits `first` requests' records, lets its writer move them, commits `then` more, and is
# killed (SIGKILL, nothing cleans up) before its writer moves those: the flush interval is an hour.
_DIES = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from idgate.audit.writer import AuditWriter
    from tests.audit.test_stores import request

    path, first, then = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

    async def main() -> None:
        writer = AuditWriter(path, flush_interval=3600)
        writer.start()
        for n in range(first):
            await writer.commit(*request(f"early-{n}", "alice"))
        assert writer.flush(10)
        for n in range(then):
            await writer.commit(*request(f"late-{n}", "alice"))
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


# A process whose disk fills in the middle of a commit (a file-size limit: the write is cut short), and is
# killed later: the refused commit's start must not reach the trail, the commits around it must.
_CUT_SHORT = textwrap.dedent(
    """
    import asyncio, os, resource, signal, sys
    from pathlib import Path
    from idgate.audit.writer import AuditWriter
    from idgate.errors import ServiceUnavailable
    from tests.audit.test_stores import request

    path = Path(sys.argv[1])

    async def main() -> None:
        writer = AuditWriter(path, flush_interval=3600)
        writer.start()
        await writer.commit(*request("before", "alice"))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = writer.journal._current.size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, resource.RLIM_INFINITY))
        try:
            await writer.commit(*request("refused", "alice"))
        except ServiceUnavailable:
            pass
        else:
            raise SystemExit("the cut-short commit was acknowledged")
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        await writer.commit(*request("after", "alice"))
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


@contextlib.contextmanager
def running(path: Path, flush_interval: float) -> Iterator[AuditWriter]:
    """A started writer on the trail at `path`, closed at the end."""
    writer = AuditWriter(path, flush_interval=flush_interval)
    writer.start()
    try:
        yield writer
    finally:
        writer.close()


def run_and_kill(script: str, *args: object) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, timeout=60)
    assert done.returncode == -9


def killed_after(path: Path, first: int, then: int) -> None:
    run_and_kill(_DIES, path, first, then)


def request_ids(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as connection:
        rows = connection.execute("SELECT request_id FROM audit_records ORDER BY seq").fetchall()
    return [row[0] for row in rows]


def journal_lines(path: Path) -> list[bytes]:
    return [line for file in sorted(journal_folder(path).iterdir()) for line in file.read_bytes().splitlines()]


def test_a_killed_process_journal_is_moved_exactly_once_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    killed_after(path, first=10, then=7)
    assert len(request_ids(path)) == 30  # the early ones were moved before the kill
    assert len(journal_lines(path)) == 51  # all of them are in the journal; the trail knows how far it got
    report = verify(path, {"keys": []})
    assert report.ok and report.notes == [
        "note: 21 records are in the commit journal, not yet in the trail (a running gateway moves them within"
        " `audit.flush_interval_seconds`; a stopped one's, at the next start)"
    ]

    writer = AuditWriter(path)
    writer.start()  # moves the rest before anything else
    ids = request_ids(path)
    assert ids == [f"early-{n}" for n in range(10) for _ in range(3)] + [
        f"late-{n}" for n in range(7) for _ in range(3)
    ]
    writer.close()
    assert list(journal_folder(path).iterdir()) == []
    after = verify(path, {"keys": []})
    assert after.ok and after.notes == []


def test_a_torn_last_line_is_skipped_and_an_altered_line_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    killed_after(path, first=0, then=2)
    (journal,) = journal_folder(path).iterdir()
    with journal.open("ab") as file:  # a write the kill cut short: its commit never returned
        file.write(b'{"kind":"decision","request_id":"torn"')
    writer = AuditWriter(path)
    writer.start()
    writer.close()
    assert request_ids(path) == [f"late-{n}" for n in range(2) for _ in range(3)]

    killed_after(path, first=0, then=2)
    (journal,) = journal_folder(path).iterdir()
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([lines[0], b"not a record\n", *lines[2:]]))
    with pytest.raises(ValueError, match="is not a record; the file was altered"):
        AuditWriter(path).start()


async def test_a_running_writer_journal_is_not_taken_by_another(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    first = AuditWriter(path, flush_interval=3600)
    first.start()
    await first.commit(*request("one", "alice"))
    second = AuditWriter(path)
    second.start()  # the first one's file is locked: not left over
    try:
        assert request_ids(path) == []
        assert first.flush()
        assert request_ids(path) == ["one"] * 3
    finally:
        second.close()
        first.close()
    assert request_ids(path) == ["one"] * 3


async def test_a_full_disk_refuses_the_commit_and_the_next_goes_to_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with running(path, 3600) as writer:
        await writer.commit(*request("before", "alice"))
        assert writer.journal is not None
        current = writer.journal._current
        assert current is not None
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, current.fd)  # the journal's disk is full (ENOSPC on every write)
        os.close(full)
        with pytest.raises(ServiceUnavailable):
            await writer.commit(*request("refused", "alice"))
        await writer.commit(*request("after", "alice"))
        assert writer.flush()
        assert len(list(journal_folder(path).iterdir())) == 1  # the file given up on is gone once settled
    assert request_ids(path) == ["before"] * 3 + ["after"] * 3
    assert list(journal_folder(path).iterdir()) == []


def test_a_commit_cut_short_is_cut_off_the_journal(tmp_path: Path) -> None:
    """A refused commit leaves no line behind: a crash later does not put half of it on record."""
    path = tmp_path / "audit.db"
    run_and_kill(_CUT_SHORT, path)
    assert len(list(journal_folder(path).iterdir())) == 1  # the same file went on: nothing leaked
    writer = AuditWriter(path)
    writer.start()
    writer.close()
    assert request_ids(path) == ["before"] * 3 + ["after"] * 3


async def test_a_new_journal_file_is_locked_before_it_is_seen(tmp_path: Path) -> None:
    """Recovery running while a writer rotates never finds one of its files unlocked (and deletes it)."""
    path = tmp_path / "audit.db"
    writer = AuditWriter(path, flush_interval=3600)
    assert writer.journal is not None
    writer.journal._rotate_bytes = 1  # a new file for every commit
    writer.start()
    taken: list[str] = []
    stop = threading.Event()

    def recover_all_the_time() -> None:
        while not stop.is_set():
            for left in left_over(journal_folder(path)):
                taken.append(left.name)
                left.remove()

    recovering = threading.Thread(target=recover_all_the_time)
    recovering.start()
    try:
        for n in range(300):
            await writer.commit(*request(f"r{n}", "alice"))
        assert writer.flush()
    finally:
        stop.set()
        recovering.join()
        writer.close()
    assert taken == []
    assert len(request_ids(path)) == 900
    assert list(journal_folder(path).iterdir()) == []


def test_a_writer_stuck_at_close_keeps_its_journal_locked(tmp_path: Path) -> None:
    """If the writer's thread outlives `close()` (the store locked by someone else), a starting process
    must not move the same records: the journal stays locked until the thread (or the process) ends."""
    path = tmp_path / "audit.db"
    writer = AuditWriter(path, flush_interval=3600)
    writer.start()
    asyncio.run(writer.commit(*request("one", "alice")))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the trail's write lock, held elsewhere
    try:
        writer.close(timeout=0.3)  # its last batch waits for the lock: stuck
        assert list(left_over(journal_folder(path))) == []
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert writer._thread is not None
    writer._thread.join(15)
    late = AuditWriter(path)
    late.start()
    late.close()
    assert request_ids(path) == ["one"] * 3


async def test_a_deleted_journal_folder_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with running(path, 0.01) as writer:
        await writer.commit(*request("before", "alice"))
        shutil.rmtree(journal_folder(path))
        await writer.commit(*request("during", "alice"))  # into the deleted file: kept in memory
        wait_for(lambda: journal_folder(path).is_dir() or writer.journal is None or writer.journal._current is None)
        await writer.commit(*request("after", "alice"))  # a new file in a new folder
        assert [p.suffix for p in journal_folder(path).iterdir()] == [".jsonl"]
        assert writer.flush()
    assert request_ids(path) == [i for i in ("before", "during", "after") for _ in range(3)]


def test_what_is_not_a_journal_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    folder = journal_folder(path)
    folder.mkdir()
    os.mkfifo(folder / "planted.jsonl")  # would hang a reader
    with pytest.raises(OSError, match="not a regular file"):
        AuditWriter(path).start()
    (folder / "planted.jsonl").unlink()
    (tmp_path / "elsewhere.jsonl").write_bytes(b"")
    (folder / "link.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(OSError, match="cannot be opened"):
        AuditWriter(path).start()
    (folder / "link.jsonl").unlink()
    (folder / "odd.jsonl").write_bytes(b'{"kind": "decision"}\n{"request_id": "x", "kind": "identity", "time": 1}\n')
    with pytest.raises(ValueError, match="byte 0 is not a record"):
        AuditWriter(path).start()
    (folder / "odd.jsonl").write_bytes(b'{"request_id": "x", "kind": "identity", "time": 1}\n[1]\n')
    with pytest.raises(ValueError, match="byte 51 is not a record"):
        AuditWriter(path).start()


def test_old_sqlite_parameter_limits_are_kept(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "audit.db")
    store.open()
    store._writer().setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)  # SQLite before 3.32
    records = [r for n in range(700) for r in request(f"r{n}", "alice")]
    store.append(records)
    store.close()
    assert len(request_ids(tmp_path / "audit.db")) == 2100
    assert verify(tmp_path / "audit.db", {"keys": []}).ok


async def test_rotated_files_are_deleted_once_in_the_trail(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    writer = AuditWriter(path, flush_interval=3600)
    assert writer.journal is not None
    writer.journal._rotate_bytes = 4096
    writer.start()
    try:
        for n in range(40):
            await writer.commit(*request(f"r{n}", "alice"))
        files = list(journal_folder(path).iterdir())
        assert len(files) > 3  # rotated; each retired file kept until the trail holds it
        assert writer.flush()
        assert len(list(journal_folder(path).iterdir())) <= 1  # at most the one being written
    finally:
        writer.close()
    assert len(request_ids(path)) == 120
    assert verify(path, {"keys": []}).ok


async def test_journaled_records_wait_out_a_broken_store_and_land_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with running(path, 0.01) as writer:
        await writer.commit(*request("before", "alice"))
        assert writer.flush()
        with closing(sqlite3.connect(path)) as connection, connection:
            connection.execute("ALTER TABLE audit_records RENAME TO hidden")
        await writer.commit(*request("during", "alice"))  # durable in the journal
        wait_for(lambda: not writer.healthy, timeout=5)
        with pytest.raises(ServiceUnavailable):  # the gateway now refuses until the store is back
            await writer.commit(*request("refused", "alice"))
        with closing(sqlite3.connect(path)) as connection, connection:
            connection.execute("ALTER TABLE hidden RENAME TO audit_records")
        wait_for(lambda: writer.healthy, timeout=5)
        assert writer.flush()
    assert request_ids(path) == ["before"] * 3 + ["during"] * 3
    assert verify(path, {"keys": []}).ok


def test_the_commit_costs_no_transaction(tmp_path: Path) -> None:
    """What the journal is for: a commit appends one line per record and touches no SQLite transaction."""
    path = tmp_path / "audit.db"
    with running(path, 3600) as writer:
        records: list[dict[str, Any]] = request("one", "alice")
        asyncio.run(writer.commit(*records))
        assert writer.batches == 0 and request_ids(path) == []
        assert [orjson.loads(line)["kind"] for line in journal_lines(path)] == ["identity", "decision", "model"]
