"""The writer's hash chain and checkpoints, without a gateway."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

from idgate.audit.chain import GENESIS, canonical, checkpoint_signer, link, read_checkpoint
from idgate.audit.verify import verify
from idgate.audit.writer import AuditWriter
from idgate.sts.keys import SigningKeys


def record(writer: str, n: int) -> dict[str, Any]:
    return {"kind": "request", "version": 1, "request_id": f"{writer}-{n}", "time": 1.5 + n, "subject": {"id": "a"}}


def test_canonical_bytes_sort_keys_and_leave_out_the_chain_fields() -> None:
    assert canonical({"b": 1, "a": {"d": 2, "c": 3}, "hash": "x", "prev_hash": "y"}) == b'{"a":{"c":3,"d":2},"b":1}'
    assert link(GENESIS, b"{}") == link("0" * 64, b"{}") != link(GENESIS, b"{ }")


def test_the_first_record_links_to_genesis_and_each_to_the_one_before(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path / "audit.db")
    writer.start()
    for n in range(3):
        writer.emit(record("w", n))
    assert writer.flush()
    writer.close()
    with closing(sqlite3.connect(tmp_path / "audit.db")) as connection:
        rows = connection.execute("SELECT record, prev_hash, hash FROM audit_records ORDER BY seq").fetchall()
    previous = GENESIS
    for body, prev_hash, digest in rows:
        assert prev_hash == previous and digest == link(prev_hash, body)
        previous = digest


def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    keys = SigningKeys.open(tmp_path)
    writers = [AuditWriter(path, 0.001, sign=checkpoint_signer(keys), checkpoint_every=7) for _ in range(2)]
    for writer in writers:
        writer.start()

    def append(index: int) -> None:
        for n in range(300):
            writers[index].emit(record(f"w{index}", n))
            if n % 10 == 0:
                writers[index].flush()

    threads = [threading.Thread(target=append, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for writer in writers:
        assert writer.flush()
        writer.close()

    report = verify(path, keys.jwks())
    assert report.ok, report.lines()
    assert report.records == 600
    assert report.checkpoints >= 2
    with closing(sqlite3.connect(path)) as connection:
        heads = connection.execute(
            "SELECT count(*) FROM audit_records GROUP BY prev_hash HAVING count(*) > 1"
        ).fetchall()
        last = connection.execute("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1").fetchone()
        final = connection.execute("SELECT seq, hash, jws FROM audit_checkpoints ORDER BY id DESC LIMIT 1").fetchone()
    assert heads == []  # no two records follow the same one: the chain did not fork
    assert (final[0], final[1]) == tuple(last)  # the clean close signed the head
    assert read_checkpoint(final[2], keys.jwks())["seq"] == last[0]


def test_no_signer_no_checkpoints(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path / "audit.db", checkpoint_every=1)
    writer.start()
    writer.emit(record("w", 0))
    assert writer.flush()
    writer.close()
    report = verify(tmp_path / "audit.db", {"keys": []})
    assert report.ok and report.checkpoints == 0 and report.records == 1


def test_a_trail_written_before_the_chain_is_continued(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.executescript(
            "CREATE TABLE audit_records (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,"
            " kind TEXT NOT NULL, time REAL NOT NULL, subject TEXT, record BLOB NOT NULL);"
            """INSERT INTO audit_records (request_id, kind, time, record) VALUES ('old', 'request', 1.0, '{}');"""
        )
    writer = AuditWriter(path)
    writer.start()
    writer.emit(record("w", 0))
    assert writer.flush()
    writer.close()
    report = verify(path, {"keys": []})
    assert report.ok, report.lines()
    assert report.lines()[0] == "note: seq 1..1 predate the hash chain; not verified"
