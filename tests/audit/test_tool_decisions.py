"""A chat request's function tools: each one's policy decision is a `decision` record of its own."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from idgate.audit.query import explain, query
from tests.conftest import MakeGateway, base_config
from tests.support import Gateway, TestIssuer, Upstream, wait_for

# The demo policy (`entitled-tool`) with entity data that entitles everyone to `get_weather` only.
ENTITIES = """
tools:
  - {server: functions, name: get_weather, action: read}
entitlements:
  - tenant: "*"
    models: [gpt-test, embed-test, beta-only]
    tools: [functions/get_weather]
"""


def tool(name: str) -> Any:  # a ChatCompletionFunctionToolParam
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


def tools_gateway(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path, **policy: Any
) -> Gateway:
    entities = tmp_path / "entities.yaml"
    entities.write_text(ENTITIES)
    config = base_config(issuer, upstream)
    config["policy"] = {"entities": [str(entities)], **policy}
    return make_gateway(config)


def of_request(gateway: Gateway, request_id: str) -> list[dict[str, Any]]:
    return [r for r in gateway.raw_records() if r["request_id"] == request_id]


def chat_with_tools(gateway: Gateway, token: str, trace: str) -> Any:
    headers = {"traceparent": f"00-{trace}-{os.urandom(8).hex()}-01"}
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, default_headers=headers) as client:
        return client.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "weather in Lyon?"}],
            tools=[tool("get_weather"), tool("delete_account")],
        )


def check_tool_decisions(records: list[dict[str, Any]], trace_id: str, task: str) -> None:
    """identity, then the model's decision, then one per tool: allowed by `entitled-tool`, and refused."""
    identity, model_decision, weather, delete = records[:4]
    assert [r["kind"] for r in records[:4]] == ["identity", "decision", "decision", "decision"]
    assert model_decision["resource"] == {"type": "model", "id": "gpt-test"} and model_decision["allowed"]
    for record in (weather, delete):
        assert record["request_id"] == identity["request_id"] and record["trace_id"] == trace_id
        assert record["action"] == "call_tool" and record["revision"] == model_decision["revision"]
        assert record["context"]["data_class"] == model_decision["context"]["data_class"]
        assert record["context"]["tenant"] == "acme" and record["context"]["task"] == task
        assert record["subject"] == {"id": "alice", "tenant": "acme"}
    assert weather["resource"] == {"type": "tool", "id": "functions/get_weather"}
    assert weather["context"]["tool"] == "get_weather"
    assert weather["allowed"] is True and weather["policies"] == ["entitled-tool"] and weather["errors"] == []
    assert delete["resource"] == {"type": "tool", "id": "functions/delete_account"}
    assert delete["allowed"] is False and delete["reason"] == "scope" and delete["policies"] == []
    assert len({r["decision_id"] for r in (model_decision, weather, delete)}) == 3


def test_each_offered_tool_has_its_own_decision_record(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    gateway = tools_gateway(make_gateway, issuer, upstream, tmp_path)
    trace = os.urandom(16).hex()
    seen: list[list[str]] = []
    # The upstream, on receiving the call, finds every decision committed (invariant 6), by a reader of its own.
    upstream.on_request = lambda body: seen.append(committed_kinds(gateway, trace))
    raw = chat_with_tools(gateway, issuer.mint({"sub": "alice", "tenant": "acme", "task": "task-1"}), trace)
    request_id = raw.headers["x-request-id"]
    assert [t["function"]["name"] for t in upstream.received[-1]["body"]["tools"]] == ["get_weather"]
    assert seen == [["decision", "decision", "decision", "identity"]]
    wait_for(lambda: len(of_request(gateway, request_id)) == 5)
    records = of_request(gateway, request_id)
    assert [r["kind"] for r in records] == ["identity", "decision", "decision", "decision", "model"]
    check_tool_decisions(records, trace, "task-1")
    assert records[4]["tools_offered"] == ["get_weather", "delete_account"]
    assert records[4]["tools_removed"] == ["delete_account"]
    # A request without tools has only the model's decision (the benchmark path: no more records).
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=issuer.mint(), max_retries=0) as client:
        plain = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    plain_id = plain.headers["x-request-id"]
    wait_for(lambda: len(of_request(gateway, plain_id)) == 3)
    assert [r["kind"] for r in of_request(gateway, plain_id)] == ["identity", "decision", "model"]

    gateway.stop()
    story = explain(gateway.config.audit_path, request_id)
    assert "call_tool on tool `functions/get_weather`: allowed (offered to the model)" in story
    assert "policies `entitled-tool`" in story
    assert "call_tool on tool `functions/delete_account`: refused (removed before the model saw the request)" in story
    assert "saw data class" in story
    # Found by the tool its decision names, and as a request with a refused decision.
    assert [r["request_id"] for r in query(gateway.config.audit_path, tool="functions/delete_account")] == [request_id]
    assert [r["request_id"] for r in query(gateway.config.audit_path, decision="deny")] == [request_id]
    assert [r["request_id"] for r in query(gateway.config.audit_path, decision="allow")] == [plain_id]


def committed_kinds(gateway: Gateway, trace: str) -> list[str]:
    """The kinds of the records of trace `trace` durable now: in the trail, or in the commit journal beside it."""
    path = gateway.config.audit_path
    with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as connection:
        stored = [row[0] for row in connection.execute("SELECT record FROM audit_records ORDER BY seq")]
    pending = path.with_name(f"{path.name}.pending")
    journaled = [line for f in sorted(pending.iterdir()) for line in f.read_bytes().split()] if pending.is_dir() else []
    # why: a record can be in both for a moment (moved into the trail, its journal not yet dropped)
    unique = {orjson.dumps(r, option=orjson.OPT_SORT_KEYS): r for r in map(orjson.loads, stored + journaled)}
    return sorted(r["kind"] for r in unique.values() if r.get("trace_id") == trace)


def test_a_request_refused_for_its_tools_has_their_decisions(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    gateway = tools_gateway(make_gateway, issuer, upstream, tmp_path, unentitled_tools="refuse")
    trace = os.urandom(16).hex()
    with pytest.raises(openai.PermissionDeniedError, match="delete_account") as refused:
        chat_with_tools(gateway, issuer.mint({"sub": "alice", "tenant": "acme", "task": "task-2"}), trace)
    assert upstream.received == []
    request_id = refused.value.response.headers["x-request-id"]
    wait_for(lambda: len(of_request(gateway, request_id)) == 4)
    records = of_request(gateway, request_id)
    assert records[0]["kind"] == "identity" and records[0]["status"] == 403
    check_tool_decisions(records, trace, "task-2")
    gateway.stop()
    story = explain(gateway.config.audit_path, request_id)
    assert "call_tool on tool `functions/delete_account`: refused (the request was refused for it)" in story
    assert "nothing was forwarded" in story
