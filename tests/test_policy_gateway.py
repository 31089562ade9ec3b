"""Policy at request time, through the gateway with the real openai SDK."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import MakeGateway, base_config
from tests.support import Gateway, TestIssuer, Upstream, wait_for

CARD = "4111 1111 1111 1111"  # a valid Luhn
NOT_A_CARD = "4111 1111 1111 1112"  # the same digits, Luhn broken
TOOLS_ENTITIES = """
tools:
  - {server: functions, name: get_weather, action: read}
  - {server: functions, name: lookup, action: read}
entitlements:
  - tenant: "*"
    models: [gpt-test, embed-test, beta-only]
    tools: [functions/get_weather, functions/lookup]
"""


def tool(name: str) -> Any:  # a ChatCompletionFunctionToolParam
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


def tools_gateway(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path, **policy: Any
) -> Gateway:
    """A gateway whose entity data entitles everyone to two of the function tools (TOOLS_ENTITIES)."""
    entities = tmp_path / "entities.yaml"
    entities.write_text(TOOLS_ENTITIES)
    config = base_config(issuer, upstream)
    config["policy"] = {"entities": [str(entities)], **policy}
    return make_gateway(config)


def sdk(gateway: Gateway, token: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, default_headers=headers)


def ask(client: openai.OpenAI, text: str, model: str = "gpt-test") -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content or ""


def test_cross_tenant_model_is_refused_with_the_reason(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    with sdk(gateway, issuer.mint({"tenant": "acme"})) as acme, pytest.raises(openai.PermissionDeniedError) as refused:
        ask(acme, "hello", model="beta-only")
    body = refused.value.body
    assert isinstance(body, dict) and "(tenant)" in body["message"] and "forbid" not in body["message"]
    assert upstream.received == []
    record = gateway.record(refused.value.response.headers["x-request-id"])
    assert record["decision"]["allowed"] is False and record["decision"]["reason"] == "tenant"
    assert record["decision"]["policies"] == ["tenant-isolation"]
    assert record["decision"]["id"] == body["decision_id"]
    assert record["decision"]["revision"].startswith("pol_")


def test_a_card_number_is_confidential_whatever_the_caller_declares(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    token = issuer.mint()
    with sdk(gateway, token) as client, sdk(gateway, token, **{"X-Idgate-Data-Class": "public"}) as lying:
        assert ask(client, f"my card is {NOT_A_CARD}") == "upstream says hi"  # invalid Luhn: not flagged
        for caller in (client, lying):
            with pytest.raises(openai.PermissionDeniedError, match=r"\(data_class\)"):
                ask(caller, f"my card is {CARD}")
    assert len(upstream.received) == 1
    refused = gateway.records()[-1]
    assert refused["data_class"] == "confidential"
    assert refused["findings"] == [{"detector": "payment_card", "data_class": "confidential", "count": 1}]
    assert CARD not in str(gateway.records())


def test_a_caller_can_raise_its_class_but_not_name_an_unknown_one(gateway: Gateway, issuer: TestIssuer) -> None:
    raised = sdk(gateway, issuer.mint(), **{"X-Idgate-Data-Class": "restricted"})
    with raised, pytest.raises(openai.PermissionDeniedError, match=r"\(data_class\)"):
        ask(raised, "nothing special")
    unknown = sdk(gateway, issuer.mint(), **{"X-Idgate-Data-Class": "secret"})
    with unknown, pytest.raises(openai.BadRequestError, match="data class `secret` is not defined"):
        ask(unknown, "nothing special")


def test_delegation_needs_a_human_task(gateway: Gateway, issuer: TestIssuer) -> None:
    no_task = issuer.mint({"act": {"sub": "bot"}})
    with_task = issuer.mint({"act": {"sub": "bot"}, "task": "task-7"})
    for_a_service = issuer.mint({"kind": "service", "act": {"sub": "bot"}, "task": "task-7"})
    too_deep = issuer.mint(
        {"task": "t", "act": {"sub": "a", "act": {"sub": "b", "act": {"sub": "c", "act": {"sub": "d"}}}}}
    )
    with sdk(gateway, with_task) as client:
        assert ask(client, "hi") == "upstream says hi"
    for token, reason in ((no_task, "delegation"), (for_a_service, "delegation"), (too_deep, "delegation")):
        with sdk(gateway, token) as client, pytest.raises(openai.PermissionDeniedError, match=rf"\({reason}\)"):
            ask(client, "hi")


def test_unentitled_tools_are_removed_before_the_model_sees_them(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    gateway = tools_gateway(make_gateway, issuer, upstream, tmp_path)
    with sdk(gateway, issuer.mint()) as client:
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            tools=[tool("get_weather"), tool("delete_account"), tool("lookup")],
            tool_choice={"type": "function", "function": {"name": "delete_account"}},
        )
    seen = upstream.received[-1]["body"]
    assert [t["function"]["name"] for t in seen["tools"]] == ["get_weather", "lookup"]
    assert seen["tool_choice"] == "auto"  # it forced a tool that is gone
    record = gateway.records()[-1]
    assert record["tools_offered"] == ["get_weather", "delete_account", "lookup"]
    assert record["tools_removed"] == ["delete_account"]


def test_unentitled_tools_can_refuse_the_request(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    gateway = tools_gateway(make_gateway, issuer, upstream, tmp_path, unentitled_tools="refuse")
    with sdk(gateway, issuer.mint()) as client, pytest.raises(openai.PermissionDeniedError, match="delete_account"):
        client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            tools=[tool("get_weather"), tool("delete_account")],
        )
    assert upstream.received == []


def test_a_policy_that_does_not_validate_is_refused_at_start(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.cedar"
    bad.write_text('@id("typo")\npermit (principal, action, resource)\nwhen { resource.tenat == "x" };\n')
    config = base_config(issuer, upstream)
    config["policy"] = {"files": [str(bad)]}
    with pytest.raises(Exception, match=r"bad\.cedar:3.*tenat"):
        make_gateway(config)


def test_a_bad_hot_reload_keeps_the_old_policies(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.cedar"
    policy.write_text('@id("all")\npermit (principal, action, resource);\n')
    config = base_config(issuer, upstream)
    config["policy"] = {"files": [str(policy)], "reload_interval_seconds": 0.05}
    gateway = make_gateway(config)
    token = issuer.mint({"tenant": "acme"})
    with sdk(gateway, token) as client:
        assert ask(client, "hi", model="beta-only") == "upstream says hi"  # permit-all: no tenant rule
        before = gateway.app.policies.revision
        policy.write_text('@id("broken")\npermit (principal, action, resource) when { resource.nope };\n')
        time.sleep(0.5)
        assert gateway.app.policies.revision == before
        assert ask(client, "hi", model="beta-only") == "upstream says hi"
        policy.write_text('@id("only-shared")\npermit (principal, action, resource) when { resource.tenant == "*" };\n')
        deadline = time.monotonic() + 5
        while gateway.app.policies.revision == before and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.PermissionDeniedError):
            ask(client, "hi", model="beta-only")


def test_tool_calls_for_unentitled_tools_are_flagged(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    """A model asking for a tool the caller may not use: flagged in the answer and the record."""
    gateway = tools_gateway(make_gateway, issuer, upstream, tmp_path)
    upstream.mode = "rogue-tool"
    with sdk(gateway, issuer.mint()) as client:
        reply = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], tools=[tool("get_weather")]
        )
        assert reply.http_response.json()["idgate"] == {"flagged_tool_calls": ["delete_account"]}
        assert gateway.records()[-1]["tool_calls_flagged"] == ["delete_account"]
        stream = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], tools=[tool("get_weather")], stream=True
        )
        names = [c.function.name for chunk in stream for c in chunk.choices[0].delta.tool_calls or [] if c.function]
        assert names == ["delete_account"]  # relayed as it came; the record says what happened
    # why wait: the stream's record is committed after its last event, which the SDK may have read first
    wait_for(lambda: gateway.records()[-1].get("tool_calls_flagged") == ["delete_account"])


def test_the_stream_scan_sees_tool_calls_split_across_chunks() -> None:
    from idgate.proxy.api import _ToolCallScan

    event = (
        b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "rm"}}]}}]}\n\n'
    )
    for cut in range(1, len(event)):
        scan = _ToolCallScan()
        assert scan.feed(event[:cut]) + scan.feed(event[cut:] + b"data: [DONE]\n\n") == ["rm"], cut
    assert _ToolCallScan().feed(b'data: {"choices": [{"delta": {"content": "tool_calls"}}]}\n\n') == []
