"""`query`, `explain` and `idgate audit query|explain` over a trail a real gateway wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from idgate.audit.query import UnknownRequest, explain, parse_when, query
from tests.conftest import MakeGateway, base_config
from tests.support import TestIssuer, Upstream, raw_request

AGENT = "billing-bot"
TASK = "task-invoices-42"


@dataclass
class Trail:
    home: Path
    path: Path
    delegated: str  # alice, through the agent, for a task: allowed
    refused: str  # alice asking for another tenant's model: 403
    direct: str  # alice alone: allowed
    records: dict[str, dict[str, Any]]

    def cli(self, *words: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_")}
        env["IDGATE_HOME"] = str(self.home)
        return subprocess.run(
            [sys.executable, "-m", "idgate", "audit", *words],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


def _chat(url: str, token: str, model: str) -> tuple[int, str]:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "mail bob@example.com"}]})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    response = raw_request(url, "POST", "/v1/chat/completions", body, headers)
    return response.status, response.headers["x-request-id"]


@pytest.fixture
def trail(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream) -> Trail:
    gateway = make_gateway(base_config(issuer, upstream))
    alice = issuer.mint({"sub": "alice", "tenant": "acme"})
    delegated_token = issuer.mint({"sub": "alice", "tenant": "acme", "act": {"sub": AGENT}, "task": TASK})
    status, direct = _chat(gateway.url, alice, "gpt-test")
    assert status == 200
    status, delegated = _chat(gateway.url, delegated_token, "gpt-test")
    assert status == 200
    status, refused = _chat(gateway.url, alice, "beta-only")
    assert status == 403
    records = {r["request_id"]: r for r in gateway.records()}
    gateway.stop()
    return Trail(gateway.config.home, gateway.config.audit_path, delegated, refused, direct, records)


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["request_id"] for r in records]


def test_query_filters_by_agent_and_subject(trail: Trail) -> None:
    assert ids(query(trail.path, agent=AGENT, subject="alice")) == [trail.delegated]
    assert ids(query(trail.path, task=TASK)) == [trail.delegated]
    assert ids(query(trail.path, subject="alice")) == [trail.refused, trail.delegated, trail.direct]  # newest first
    assert ids(query(trail.path, subject="alice", limit=1)) == [trail.refused]
    assert query(trail.path, subject="bob") == []
    assert query(trail.path, agent="someone-else") == []
    assert query(trail.path, tenant="beta") == []
    assert len(query(trail.path, tenant="acme")) == 3


def test_query_filters_by_decision_model_and_time(trail: Trail) -> None:
    assert ids(query(trail.path, decision="deny")) == [trail.refused]
    assert ids(query(trail.path, decision="allow")) == [trail.delegated, trail.direct]
    assert ids(query(trail.path, model="beta-only")) == [trail.refused]
    assert query(trail.path, tool="delete_account") == []
    assert len(query(trail.path, since="1h")) == 3
    assert query(trail.path, until="1h") == []
    assert query(trail.path, since="2999-01-01T00:00:00Z") == []
    assert len(query(trail.path, since="2000-01-01", until="2999-01-01T00:00:00+02:00")) == 3
    with pytest.raises(ValueError, match="decision"):
        query(trail.path, decision="maybe")


def test_parse_when() -> None:
    now = 1_000_000.0
    assert parse_when("2h", now) == now - 7200
    assert parse_when("7d", now) == now - 7 * 86400
    assert parse_when("30m", now) == now - 1800
    assert parse_when("1970-01-02T00:00:00Z") == 86400
    assert parse_when("1970-01-02T01:00:00+01:00") == 86400
    assert parse_when("1970-01-02") == 86400  # no offset: UTC
    with pytest.raises(ValueError, match="not a time"):
        parse_when("last tuesday")
    assert abs(parse_when("0s") - time.time()) < 5


def test_explain_tells_the_delegated_story(trail: Trail) -> None:
    record = trail.records[trail.delegated]
    story = explain(trail.path, trail.delegated)
    subject, credential, decision = record["subject"], record["credential"], record["decision"]
    assert record["actors"] and record["actors"][0]["id"] == AGENT and credential["task"] == TASK
    lines = story.splitlines()
    assert lines[0].startswith(f"Request `{trail.delegated}` (trace `{record['trace_id']}`) at ")
    assert f"Who: human `alice` (tenant acme), issued by `{subject['issuer']}`." in story
    assert f"On whose behalf: agent `{AGENT}` acting for human `alice` (tenant acme)." in story
    assert (
        f"Credential: {credential['kind']} `{credential['id']}` from issuer `{credential['issuer']}`,"
        f" binding {credential['binding']}, for task `{TASK}`" in story
    )
    assert decision["allowed"] and decision["policies"]
    assert (
        f"Decision `{decision['id']}` invoke_model on model `gpt-test`: allowed (reason: {decision['reason']});"
        in story
    )
    assert f"Context: data_class {record['data_class']}, task {TASK}, tenant acme." in story
    assert f"policies {', '.join(f'`{p}`' for p in decision['policies'])}" in story
    assert f"revision `{decision['revision']}`" in story
    assert (
        f"Model: `gpt-test` via provider `up` (upstream model `real-model`) saw data class {record['data_class']}"
        in story
    )
    for finding in record["findings"] or []:
        assert finding["detector"] in story
    assert "Tools: none offered." in story
    assert f"Outcome: ok (status 200) in {record['latency_ms']} ms" in story
    assert "total_tokens 6" in story
    assert "bob@example.com" not in story  # never the prompt, only its hash
    assert f"Content: prompt SHA-256 `{record['prompt_sha256']}`, completion SHA-256 `" in story
    # The story is told from separate, linked records: who, why, what the model saw.
    assert record["kinds"] == ["identity", "decision", "model"]


def test_explain_tells_a_refusal(trail: Trail) -> None:
    record = trail.records[trail.refused]
    story = explain(trail.path, trail.refused)
    verdict = record["decision"]
    assert f"Decision `{verdict['id']}` invoke_model on model `beta-only`: refused (reason: tenant);" in story
    assert record["kinds"] == ["identity", "decision"]  # nothing reached a model
    assert "Model: `beta-only`" in story and "nothing was forwarded" in story
    assert "no agent in between; human `alice` (tenant acme) called directly." in story
    assert "Outcome: refused (status 403)" in story


def test_explain_an_unknown_request(trail: Trail) -> None:
    with pytest.raises(UnknownRequest, match="no request `req_nope`"):
        explain(trail.path, "req_nope")
    with pytest.raises(FileNotFoundError):
        explain(trail.path.with_name("absent.db"), trail.delegated)


def test_cli_query_json_matches(trail: Trail) -> None:
    result = trail.cli("query", "--agent", AGENT, "--subject", "alice", "--json")
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert lines == [trail.records[trail.delegated]]
    denied = trail.cli("query", "--decision", "deny", "--since", "1h", "--json")
    assert [r["request_id"] for r in map(orjson.loads, denied.stdout.splitlines())] == [trail.refused]


def test_cli_query_table(trail: Trail) -> None:
    result = trail.cli("query", "--tenant", "acme", "--limit", "2")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["time", "request", "subject", "agents", "model", "decision", "status"]
    assert len(rows) == 2
    assert rows[0].split()[1:5] == [trail.refused, "alice@acme", "-", "beta-only"] and rows[0].endswith("403")
    assert rows[1].split()[1:6] == [trail.delegated, "alice@acme", AGENT, "gpt-test", "allow:"]
    bad = trail.cli("query", "--since", "last tuesday")
    assert bad.returncode == 1 and "not a time" in bad.stderr


def test_cli_explain(trail: Trail) -> None:
    result = trail.cli("explain", trail.delegated)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == explain(trail.path, trail.delegated)
    unknown = trail.cli("explain", "req_nope")
    assert unknown.returncode == 1
    assert unknown.stdout == "" and "idgate: no request `req_nope` in the audit trail" in unknown.stderr
