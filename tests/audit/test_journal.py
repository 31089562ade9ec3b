"""The commit journal of a SQLite trail: durable at once, moved into the chain exactly once, left-overs recovered."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from idgate.audit.journal import journal_folder
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


def killed_after(path: Path, first: int, then: int) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", _DIES, str(path), str(first), str(then)], env=env, timeout=60)
    assert done.returncode == -9


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

    writer = AuditWriter(path)
    writer.start()  # moves the rest before anything else
    ids = request_ids(path)
    assert ids == [f"early-{n}" for n in range(10) for _ in range(3)] + [
        f"late-{n}" for n in range(7) for _ in range(3)
    ]
    writer.close()
    assert list(journal_folder(path).iterdir()) == []
    assert verify(path, {"keys": []}).ok


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
    writer = AuditWriter(path, flush_interval=3600)
    writer.start()
    try:
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
    finally:
        writer.close()
    assert request_ids(path) == ["before"] * 3 + ["after"] * 3
    assert list(journal_folder(path).iterdir()) == []


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
    writer = AuditWriter(path, flush_interval=0.01)
    writer.start()
    try:
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
    finally:
        writer.close()
    assert request_ids(path) == ["before"] * 3 + ["during"] * 3
    assert verify(path, {"keys": []}).ok


def test_the_commit_costs_no_transaction(tmp_path: Path) -> None:
    """What the journal is for: a commit appends one line per record and touches no SQLite transaction."""
    path = tmp_path / "audit.db"
    writer = AuditWriter(path, flush_interval=3600)
    writer.start()
    try:
        records: list[dict[str, Any]] = request("one", "alice")
        asyncio.run(writer.commit(*records))
        assert writer.batches == 0 and request_ids(path) == []
        assert [orjson.loads(line)["kind"] for line in journal_lines(path)] == ["identity", "decision", "model"]
    finally:
        writer.close()
