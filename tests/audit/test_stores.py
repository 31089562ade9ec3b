"""One contract for every audit store (SQLite, PostgreSQL): append, one chain across writers, verify, query, retain."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import psycopg

from idgate.audit.query import explain, query
from idgate.audit.records import action_record
from idgate.audit.stores import PostgresStore, SqliteStore, Store
from idgate.audit.verify import verify
from idgate.audit.writer import AuditWriter
from idgate.sts.keys import SigningKeys
from tests.audit.conftest import MakeStore
from tests.conftest import MakeGateway, base_config
from tests.support import PG_DSN, TestIssuer, Upstream, raw_request

DAY = 86400.0


def request(request_id: str, subject: str, *, when: float | None = None, allowed: bool = True) -> list[dict[str, Any]]:
    """The records of one request, shaped as the gateway writes them."""
    when = time.time() if when is None else when
    who = {"kind": "human", "id": subject, "tenant": "acme", "issuer": "https://idp", "groups": []}
    base = {"v": 1, "request_id": request_id, "trace_id": "ab" * 16, "time": when}
    identity = {**base, "kind": "identity", "method": "POST", "path": "/v1/chat/completions", "subject": who}
    identity.update({"actors": [{"id": "bot", "kind": "agent", "issuer": None}], "credential": {"id": "jti-1"}})
    decision = {
        **base,
        "kind": "decision",
        "subject": {"id": subject, "tenant": "acme"},
        "action": "invoke_model",
        "resource": {"type": "model", "id": "gpt"},
        "context": {"data_class": "internal"},
        "decision_id": f"dec-{request_id}",
        "allowed": allowed,
        "reason": "allowed" if allowed else "tenant",
        "policies": ["p1"],
        "errors": [],
        "revision": "pol_1",
    }
    if not allowed:
        identity.update({"status": 403, "outcome": "refused", "error": None, "latency_ms": 1.0})
        return [identity, decision]
    model = {**base, "kind": "model", "subject": {"id": subject, "tenant": "acme"}, "model": "gpt", "provider": "up"}
    model.update({"status": 200, "outcome": "ok", "error": None, "latency_ms": 2.0, "prompt_sha256": "00" * 32})
    return [identity, decision, model]


def sql(store: Store, statement: str, *parameters: Any) -> None:
    """Change the trail behind the store's back (SQL with `?` marks; `@records` names the table)."""
    if isinstance(store, SqliteStore):
        with closing(sqlite3.connect(store.path)) as connection, connection:
            connection.execute(statement.replace("@records", "audit_records"), parameters)
    else:
        assert isinstance(store, PostgresStore)
        with psycopg.connect(PG_DSN) as pg:
            text = statement.replace("@records", f'"{store.schema}".audit_records').replace("?", "%s")
            pg.execute(text.encode(), parameters)


def body_at(store: Store, seq: int) -> dict[str, Any]:
    row = next(r for r in store.chain_rows() if r[0] == seq)
    record: dict[str, Any] = orjson.loads(row[4])
    return record


def test_appended_records_chain_and_verify(make_store: MakeStore, keys: SigningKeys) -> None:
    store = make_store(checkpoint_every=4)
    store.open()
    for n in range(5):
        store.append(request(f"req-{n}", "alice"))
    store.close_checkpoint()
    rows = store.chain_rows()
    assert [r[0] for r in rows] == list(range(1, 16))
    assert rows[0][5] == "0" * 64 and all(rows[i][5] == rows[i - 1][6] for i in range(1, len(rows)))
    report = verify(store, keys.jwks())
    assert report.ok, report.lines()
    assert report.records == 15 and report.checkpoints >= 3


def test_tampering_is_named_on_every_backend(make_store: MakeStore, keys: SigningKeys) -> None:
    store = make_store(checkpoint_every=100)
    store.open()
    for n in range(4):
        store.append(request(f"req-{n}", "alice"))
    edited = {**body_at(store, 5), "allowed": False}
    sql(store, "UPDATE @records SET record = ? WHERE seq = 5", orjson.dumps(edited, option=orjson.OPT_SORT_KEYS))
    sql(store, "DELETE FROM @records WHERE seq = 9")
    problems = [(p.kind, p.seq) for p in verify(store, keys.jwks()).problems]
    assert problems == [("altered", 5), ("deleted", 9)]


def test_two_writers_extend_one_chain(make_store: MakeStore, keys: SigningKeys) -> None:
    """Two gateway processes on one trail: their batches interleave, the chain stays one."""
    writers = [AuditWriter(store=make_store(checkpoint_every=50), flush_interval=0.001) for _ in range(2)]
    for writer in writers:
        writer.start()

    def emit(writer: AuditWriter, name: str) -> None:
        for n in range(300):
            writer.emit(request(f"{name}-{n}", name)[0])
            if n % 20 == 0:
                time.sleep(0.002)

    threads = [threading.Thread(target=emit, args=(w, f"w{i}")) for i, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for writer in writers:
        assert writer.flush(10)
        writer.close()
    store = make_store()
    rows = store.chain_rows()
    assert len(rows) == 600 and [r[0] for r in rows] == list(range(1, 601))
    assert {r[1].split("-")[0] for r in rows[:300]} == {"w0", "w1"}  # they did interleave
    report = verify(store, keys.jwks())
    assert report.ok, report.lines()


async def test_concurrent_commits_share_transactions(make_store: MakeStore) -> None:
    """The group commit: 500 requests awaiting their decision's commit at once take far fewer transactions."""
    writer = AuditWriter(store=make_store(), flush_interval=0.05)
    writer.start()
    try:
        await asyncio.gather(*(writer.commit(*request(f"req-{n}", "alice")[:2]) for n in range(500)))
        if writer.journal is None:  # PostgreSQL: every commit returned after its records were committed
            assert writer.written == 1000
        else:  # SQLite: every commit returned after its records were in the journal
            lines = [line for path in writer.journal.folder.iterdir() for line in path.read_bytes().splitlines()]
            assert sorted(orjson.loads(line)["request_id"] for line in lines) == sorted(
                f"req-{n}" for n in range(500) for _ in range(2)
            )
            assert writer.flush()
        assert writer.batches < 100
    finally:
        writer.close()
    assert len(make_store().chain_rows()) == 1000


def test_query_and_explain_read_every_backend(make_store: MakeStore) -> None:
    store = make_store()
    store.open()
    now = time.time()
    store.append(request("req-old", "alice", when=now - 3 * DAY))
    store.append(request("req-bob", "bob", when=now - 60))
    store.append(request("req-refused", "alice", when=now - 30, allowed=False))
    store.append(request("req-new", "alice", when=now - 10))
    tool_call = action_record("req-new", "ab" * 16, None, "tool_call", "crm/refund", "ok", {"audience": "crm"})
    store.append([{**tool_call, "subject": {"id": "alice", "tenant": "acme"}}])
    assert [r["request_id"] for r in query(store, subject="alice")] == ["req-new", "req-refused", "req-old"]
    assert [r["request_id"] for r in query(store, subject="alice", since="1d")] == ["req-new", "req-refused"]
    assert [r["request_id"] for r in query(store, decision="deny")] == ["req-refused"]
    assert [r["request_id"] for r in query(store, agent="bot", limit=2)] == ["req-new", "req-refused"]
    found = query(store, subject="bob")[0]
    assert found["kinds"] == ["identity", "decision", "model"] and found["status"] == 200
    told = explain(store, "req-new")
    assert "Action: tool_call on `crm/refund`: ok (audience `crm`)." in told
    assert [r["request_id"] for r in query(store, tool="refund")] == ["req-new"]
    story = explain(store, "req-refused")
    assert "Decision `dec-req-refused` invoke_model on model `gpt`: refused (reason: tenant)" in story
    assert "On whose behalf: agent `bot` acting for human `alice` (tenant acme)." in story


def test_retention_keeps_the_chain_verifiable(make_store: MakeStore, keys: SigningKeys) -> None:
    """Pruning deletes up to a checkpoint and keeps it as the anchor; verify checks the rest from there."""
    store = make_store(checkpoint_every=6)
    store.open()
    now = time.time()
    for n in range(6):
        store.append(request(f"old-{n}", "alice", when=now - 40 * DAY))  # 3 records each: checkpoints every 2
    for n in range(3):
        store.append(request(f"new-{n}", "alice", when=now))
    pruned = store.prune(now - 30 * DAY)
    assert pruned == 18  # every old record: the last old one carries a checkpoint
    rows = store.chain_rows()
    assert rows[0][0] == 19 and len(rows) == 9
    store.append(request("after", "alice"))
    report = verify(store, keys.jwks())
    assert report.ok, report.lines()
    assert report.notes == ["note: seq 1..18 pruned by retention; the chain is anchored at checkpoint 18"]
    assert store.prune(now - 30 * DAY) == 0  # nothing older left

    # Deleting a prefix by hand, with no checkpoint to anchor it, is a break.
    sql(store, "DELETE FROM @records WHERE seq <= 21")
    problems = [str(p) for p in verify(store, keys.jwks()).problems]
    assert problems == [
        "deleted: seq 1..21 missing, before seq 22",
        "deleted: checkpoint 3 signed seq 18, which is missing",
    ]


def test_the_cli_verifies_and_explains_a_postgres_trail(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, pg_schema: str, tmp_path: Path
) -> None:
    config = base_config(issuer, upstream)
    config["audit"] = {"backend": "postgres", "postgres_dsn": PG_DSN, "postgres_schema": pg_schema}
    gateway = make_gateway(config)
    body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    token = issuer.mint({"sub": "alice", "tenant": "acme", "act": {"sub": "bot"}, "task": "t-1"})
    answer = raw_request(gateway.url, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {token}"})
    assert answer.status == 200
    gateway.stop()  # a clean stop signs the head
    config_file = tmp_path / "pg.yaml"
    config_file.write_bytes(orjson.dumps({**config, "server": {"audiences": ["idgate-test"]}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_")}
    env.update({"IDGATE_HOME": str(gateway.config.home), "TEST_UPSTREAM_KEY": "x"})

    def cli(*words: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "idgate", "audit", *words, "--config", str(config_file)]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)

    verified = cli("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip() == "ok: 4 records, 1 checkpoints, chain intact"  # config, identity, decision, model
    story = cli("explain", answer.headers["x-request-id"])
    assert story.returncode == 0, story.stderr
    assert "On whose behalf: agent `bot` acting for human `alice` (tenant acme)." in story.stdout
    listed = cli("query", "--agent", "bot", "--json")
    assert [orjson.loads(line)["request_id"] for line in listed.stdout.splitlines()] == [answer.headers["x-request-id"]]


def test_the_writer_prunes_by_retention_at_start(make_store: MakeStore, keys: SigningKeys) -> None:
    old = make_store(checkpoint_every=3)
    old.open()
    for n in range(4):
        old.append(request(f"old-{n}", "alice", when=time.time() - 40 * DAY))
    old.close()
    writer = AuditWriter(store=make_store(checkpoint_every=3), retention_seconds=30 * DAY)
    writer.start()
    try:
        deadline = time.monotonic() + 5
        while len(make_store().chain_rows()) == 12 and time.monotonic() < deadline:
            time.sleep(0.02)
        writer.emit(request("new", "alice")[0])
        assert writer.flush()
    finally:
        writer.close()
    store = make_store()
    assert [r[1] for r in store.chain_rows()] == ["new"]
    report = verify(store, keys.jwks())
    assert report.ok and report.notes, report.lines()
