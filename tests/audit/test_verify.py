"""`verify` and `idgate audit verify` over a trail a real gateway wrote, then tampered with by hand."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from idgate.audit.verify import Report, verify
from idgate.sts.keys import SigningKeys
from tests.conftest import MakeGateway, base_config
from tests.support import TestIssuer, Upstream, raw_request

REQUESTS = 10
RECORDS = 1 + 3 * REQUESTS  # config loaded; per request identity + decision (before forwarding), then model
CHECKPOINT_EVERY = 4


@dataclass
class Trail:
    home: Path
    path: Path
    request_ids: dict[int, str]  # seq -> request id

    def jwks(self) -> dict[str, Any]:
        return SigningKeys.open(self.home).jwks()

    def verify(self) -> Report:
        return verify(self.path, self.jwks())

    def sql(self, statement: str, *parameters: Any) -> None:
        with closing(sqlite3.connect(self.path)) as connection, connection:
            connection.execute(statement, parameters)

    def row(self, seq: int) -> tuple[Any, ...]:
        with closing(sqlite3.connect(self.path)) as connection:
            row: tuple[Any, ...] = connection.execute(
                "SELECT request_id, kind, time, subject, record, prev_hash, hash FROM audit_records WHERE seq = ?",
                (seq,),
            ).fetchone()
        return row

    def cli(self) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_")}
        env["IDGATE_HOME"] = str(self.home)
        return subprocess.run(
            [sys.executable, "-m", "idgate", "audit", "verify"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


@pytest.fixture
def trail(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream) -> Trail:
    """A gateway that signs a checkpoint every few records served ten requests, then stopped cleanly."""
    config = base_config(issuer, upstream)
    config["audit"] = {"checkpoint_every": CHECKPOINT_EVERY}
    gateway = make_gateway(config)
    token = issuer.mint()
    for n in range(REQUESTS):
        body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": f"hi {n}"}]})
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        assert raw_request(gateway.url, "POST", "/v1/chat/completions", body, headers).status == 200
        gateway.records()  # one batch per request: checkpoints fall between them
    gateway.stop()
    path = gateway.config.audit_path
    with closing(sqlite3.connect(path)) as connection:
        ids = dict(connection.execute("SELECT seq, request_id FROM audit_records").fetchall())
    return Trail(gateway.config.home, path, ids)


def kinds(report: Report) -> list[str]:
    return [problem.kind for problem in report.problems]


def test_an_untouched_trail_verifies(trail: Trail) -> None:
    report = trail.verify()
    assert report.ok, report.lines()
    assert report.records == RECORDS
    assert report.checkpoints >= 2  # at least one on the way, and one at the clean shutdown
    assert report.lines() == [f"ok: {RECORDS} records, {report.checkpoints} checkpoints, chain intact"]
    result = trail.cli()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == report.lines()[0]


def test_an_edited_field_is_named_altered(trail: Trail) -> None:
    record = orjson.loads(trail.row(3)[4])
    record["status"] = 500
    trail.sql("UPDATE audit_records SET record = ? WHERE seq = 3", orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
    report = trail.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("altered", 3)]
    assert trail.request_ids[3] in report.problems[0].message
    result = trail.cli()
    assert result.returncode == 1
    assert f"altered: seq 3 (request `{trail.request_ids[3]}`): content does not match its hash" in result.stdout


def test_an_edited_index_column_is_named_altered(trail: Trail) -> None:
    trail.sql("UPDATE audit_records SET request_id = 'someone-else' WHERE seq = 2")
    report = trail.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("altered", 2)]
    assert "`request_id`" in report.problems[0].message


def test_a_deleted_record_is_named_deleted(trail: Trail) -> None:
    with closing(sqlite3.connect(trail.path)) as connection:
        signed = {row[0] for row in connection.execute("SELECT seq FROM audit_checkpoints")}
    seq = min(set(range(2, RECORDS)) - signed)  # a record no checkpoint names: only the chain can tell
    trail.sql("DELETE FROM audit_records WHERE seq = ?", seq)
    report = trail.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("deleted", seq)]
    assert str(report.problems[0]) == f"deleted: seq {seq} missing, before seq {seq + 1}"
    assert trail.cli().returncode == 1


def test_two_swapped_records_are_named_reordered(trail: Trail) -> None:
    three, seven = trail.row(3), trail.row(7)
    columns = "request_id = ?, kind = ?, time = ?, subject = ?, record = ?, prev_hash = ?, hash = ?"
    trail.sql(f"UPDATE audit_records SET {columns} WHERE seq = 3", *seven)
    trail.sql(f"UPDATE audit_records SET {columns} WHERE seq = 7", *three)
    report = trail.verify()
    assert set(kinds(report)) == {"reordered"}
    messages = "\n".join(p.message for p in report.problems)
    assert f"seq 3 (request `{trail.request_ids[7]}`) follows seq 6 in the chain, not seq 2" in messages
    assert f"seq 7 (request `{trail.request_ids[3]}`) follows seq 2 in the chain, not seq 6" in messages
    assert trail.cli().returncode == 1


def test_a_tail_cut_after_a_checkpoint_is_named_truncated(trail: Trail) -> None:
    trail.sql("DELETE FROM audit_records WHERE seq > 6")
    report = trail.verify()
    assert "truncated" in kinds(report)
    assert set(kinds(report)) == {"truncated"}  # the chain itself is intact up to seq 6
    assert f"signed seq {RECORDS}, but the trail ends at seq 6" in str(report.problems[-1])
    result = trail.cli()
    assert result.returncode == 1 and "truncated:" in result.stdout


def test_a_forged_checkpoint_is_named(trail: Trail) -> None:
    with closing(sqlite3.connect(trail.path)) as connection:
        number, token = connection.execute("SELECT id, jws FROM audit_checkpoints ORDER BY id LIMIT 1").fetchone()
    forged = token[:-4] + ("BBBB" if token.endswith("AAAA") else "AAAA")  # another signature
    trail.sql("UPDATE audit_checkpoints SET jws = ? WHERE id = ?", forged, number)
    report = trail.verify()
    assert kinds(report) == ["checkpoint"]
    assert f"checkpoint {number}" in report.problems[0].message and "signature invalid" in report.problems[0].message


def test_checkpoints_signed_by_another_key_do_not_verify(trail: Trail, tmp_path: Path) -> None:
    report = verify(trail.path, SigningKeys.open(tmp_path / "elsewhere").jwks())
    assert kinds(report) and set(kinds(report)) == {"checkpoint"}
