"""A chat request's function tools: each one's policy decision is a `decision` record of its own."""

from __future__ import annotations

import os
import re
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from idgate.audit.query import explain, query, table_row
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
    make_gateway: MakeGateway,
    issuer: TestIssuer,
    upstream: Upstream,
    tmp_path: Path,
    entity_data: str = ENTITIES,
    **policy: Any,
) -> Gateway:
    entities = tmp_path / "entities.yaml"
    entities.write_text(entity_data)
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
    # Found by the tool its decision names; the request itself was let through (a tool removed), so it is
    # "allow", and the table says what was removed.
    assert [r["request_id"] for r in query(gateway.config.audit_path, tool="functions/delete_account")] == [request_id]
    assert [r["request_id"] for r in query(gateway.config.audit_path, decision="deny")] == []
    allowed = query(gateway.config.audit_path, decision="allow")
    assert [r["request_id"] for r in allowed] == [plain_id, request_id]
    assert table_row(allowed[1])[5] == "allow: allowed (removed functions/delete_account)"


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
    assert "functions/get_weather`: allowed (but the request was refused for another tool)" in story
    assert "nothing was forwarded" in story
    (denied,) = query(gateway.config.audit_path, decision="deny")
    assert denied["request_id"] == request_id and query(gateway.config.audit_path, decision="allow") == []
    assert table_row(denied)[5] == "deny: tool functions/delete_account"


def test_tool_names_and_counts_are_openais_and_each_name_is_decided_once(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    """Each tool is a decision record committed before forwarding, and its name is printed to reviewers:
    a name that could forge a line of `idgate audit query`, or thousands of tools, are refused (400)."""
    gateway = tools_gateway(make_gateway, issuer, upstream, tmp_path)
    token = issuer.mint({"sub": "mallory", "tenant": "acme"})
    forged = "x)  200\n2026-11-29T01:00:00Z  req_0  ceo@acme  -  gpt-test  allow  200 \x1b[8m"
    cases = [
        ([tool(forged)], "must be 1-64 letters, digits"),
        ([tool("evil/get_weather")], "must be 1-64 letters, digits"),
        ([tool("a" * 65)], "must be 1-64 letters, digits"),
        ([{"type": "function", "function": {"parameters": {}}}], "tools[0].function.name"),  # no name: not a built-in
        ([tool(f"t{n}") for n in range(129)], "at most 128 function tools"),
    ]
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0) as client:
        for tools, message in cases:
            with pytest.raises(openai.BadRequestError, match=re.escape(message)):
                client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hi"}], tools=tools
                )
        assert upstream.received == []
        twice = client.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            tools=[tool("get_weather"), tool("get_weather"), *[tool(f"t{n}") for n in range(126)]],
        )
    request_id = twice.headers["x-request-id"]
    wait_for(lambda: any(r["kind"] == "model" for r in of_request(gateway, request_id)))
    decisions = [r for r in of_request(gateway, request_id) if r["kind"] == "decision"]
    assert len(decisions) == 1 + 127  # the model, and each distinct tool once
    assert upstream.received[-1]["body"]["tools"][:2] == [tool("get_weather"), tool("get_weather")]


def test_a_refused_model_keeps_the_tools_it_was_offered_on_record(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    gateway = tools_gateway(make_gateway, issuer, upstream, tmp_path, ENTITIES.replace("gpt-test, ", ""))
    with (
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=issuer.mint(), max_retries=0) as client,
        pytest.raises(openai.PermissionDeniedError) as refused,
    ):
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], tools=[tool("delete_account")]
        )
    request_id = refused.value.response.headers["x-request-id"]
    wait_for(lambda: len(of_request(gateway, request_id)) == 2)
    gateway.stop()
    (found,) = query(gateway.config.audit_path, tool="delete_account")
    assert found["request_id"] == request_id and found["decision"]["allowed"] is False
