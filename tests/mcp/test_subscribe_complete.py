"""`resources/subscribe`, `resources/unsubscribe` and `completion/complete` are decided by policy as the read or the
`prompts/get` they serve: a caller cannot watch a resource it may not read, nor get completions for a prompt it may
not get or a resource template it may not read. A refusal never reaches the server and is on record."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from mcp import MCPError, types
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer

from idgate.mcp.gateway import LISTEN
from tests.conftest import MakeGateway
from tests.mcp.conftest import client
from tests.mcp.test_list_filtering import ARCHIVE, ENTITIES, LATEST, PAYROLL, TEMPLATE, ListServer
from tests.support import Gateway, TestIssuer


class WatchServer(ListServer):
    """The list test server (alice may read `invoices://latest` and the invoice template and get `dunning`; bob the
    archive and `apology`; nobody the payroll) that also takes subscriptions and completes arguments."""

    subscribed: list[tuple[str, str]]

    def _build(self) -> MCPServer:
        server = super()._build()
        self.subscribed = []

        async def subscribe(ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams) -> types.EmptyResult:
            self.subscribed.append(("subscribe", str(params.uri)))
            return types.EmptyResult()

        async def unsubscribe(
            ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams
        ) -> types.EmptyResult:
            self.subscribed.append(("unsubscribe", str(params.uri)))
            return types.EmptyResult()

        async def complete(ctx: ServerRequestContext[Any], params: types.CompleteRequestParams) -> types.CompleteResult:
            value = params.argument.value
            return types.CompleteResult(completion=types.Completion(values=[f"{value}-1", f"{value}-2"]))

        low = server._lowlevel_server
        low.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
        low.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)
        low.add_request_handler("completion/complete", types.CompleteRequestParams, complete)
        return server

    def methods(self, method: str) -> list[dict[str, Any]]:
        """The `params` of every request of `method` that reached the server."""
        return [
            seen.body.get("params") or {} for seen in list(self.seen) if seen.body and seen.body.get("method") == method
        ]


@pytest.fixture
def watch_server() -> Iterator[WatchServer]:
    server = WatchServer()
    yield server
    server.stop()


@pytest.fixture
def gateway(make_gateway: MakeGateway, issuer: TestIssuer, tmp_path: Path, watch_server: WatchServer) -> Gateway:
    entities = tmp_path / "watch-entities.yaml"
    entities.write_bytes(orjson.dumps(ENTITIES))  # JSON is YAML
    server = {"name": "tools", "url": watch_server.url, "timeout": {"connect": 1, "read": 1.5}}
    gateway = make_gateway(
        {
            "issuers": [{"name": "corp", "issuer": issuer.issuer, "discovery": True, "refetch_interval_seconds": 0}],
            "policy": {"entities": [str(entities)]},
            "mcp": {"servers": [server]},
        }
    )
    watch_server.issuer = gateway.url
    watch_server.jwks_url = f"{gateway.url}/.well-known/jwks.json"
    watch_server.audience = watch_server.url
    return gateway


def refused_on_record(gateway: Gateway, error: MCPError, tool_id: str) -> None:
    """The refusal is a 403-style JSON-RPC error whose decision record says no, for `tool_id`."""
    assert error.code == -32003
    request_id = error.data["request_id"]
    records = [r for r in gateway.raw_records() if r["request_id"] == request_id]
    decision = next(r for r in records if r["kind"] == "decision")
    assert decision["decision_id"] == error.data["decision_id"] and decision["allowed"] is False
    assert decision["resource"] == {"type": "tool", "id": tool_id}
    action = next(r for r in records if r["kind"] == "action")
    assert action["outcome"] == "refused" and action["target"] == tool_id


async def test_a_caller_subscribes_only_to_what_it_may_read(
    gateway: Gateway, issuer: TestIssuer, watch_server: WatchServer
) -> None:
    async with client(gateway, issuer.mint({"sub": "alice"}), mode="legacy") as mcp:
        for method in ("resources/subscribe", "resources/unsubscribe"):
            request: types.ClientRequest = (
                types.SubscribeRequest(params=types.SubscribeRequestParams(uri=LATEST))
                if method == "resources/subscribe"
                else types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=LATEST))
            )
            assert isinstance(await mcp.session.send_request(request, types.EmptyResult), types.EmptyResult)
            for uri in (PAYROLL, ARCHIVE):
                refused: types.ClientRequest = (
                    types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri))
                    if method == "resources/subscribe"
                    else types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=uri))
                )
                with pytest.raises(MCPError) as error:
                    await mcp.session.send_request(refused, types.EmptyResult)
                scoped = uri.replace(":", "%3A").replace("/", "%2F")
                refused_on_record(gateway, error.value, f"tools/resource:{scoped}")
    assert watch_server.subscribed == [("subscribe", LATEST), ("unsubscribe", LATEST)]
    assert [params["uri"] for params in watch_server.methods("resources/subscribe")] == [LATEST]
    assert [params["uri"] for params in watch_server.methods("resources/unsubscribe")] == [LATEST]


async def test_a_caller_gets_completions_only_for_what_it_may_get_or_read(
    gateway: Gateway, issuer: TestIssuer, watch_server: WatchServer
) -> None:
    argument = {"name": "invoice", "value": "A"}
    alice = issuer.mint({"sub": "alice"})
    async with client(gateway, alice) as mcp:
        done = await mcp.complete(types.PromptReference(type="ref/prompt", name="dunning"), argument)
        assert done.completion.values == ["A-1", "A-2"]
        done = await mcp.complete(types.ResourceTemplateReference(type="ref/resource", uri=TEMPLATE), argument)
        assert done.completion.values == ["A-1", "A-2"]
        for prompt in ("apology", "severance"):
            with pytest.raises(MCPError) as error:
                await mcp.complete(types.PromptReference(type="ref/prompt", name=prompt), argument)
            refused_on_record(gateway, error.value, f"tools/prompt:{prompt}")
        with pytest.raises(MCPError) as error:
            await mcp.complete(types.ResourceTemplateReference(type="ref/resource", uri="payroll://{year}"), argument)
        refused_on_record(gateway, error.value, "tools/resource:payroll%3A%2F%2F%7Byear%7D")
    refs = [params["ref"] for params in watch_server.methods("completion/complete")]
    assert refs == [{"type": "ref/prompt", "name": "dunning"}, {"type": "ref/resource", "uri": TEMPLATE}]
    # Bob may get his own prompt's completions, not alice's.
    async with client(gateway, issuer.mint({"sub": "bob"})) as mcp:
        await mcp.complete(types.PromptReference(type="ref/prompt", name="apology"), argument)
        with pytest.raises(MCPError) as error:
            await mcp.complete(types.PromptReference(type="ref/prompt", name="dunning"), argument)
        refused_on_record(gateway, error.value, "tools/prompt:dunning")
    assert len(watch_server.methods("completion/complete")) == 3


@pytest.mark.parametrize(
    "ref",
    [None, "ref/prompt", {"type": "ref/tool", "name": "refund"}, {"type": "ref/prompt"}, {"type": "ref/resource"}],
    ids=["missing", "not-an-object", "other-type", "prompt-without-name", "resource-without-uri"],
)
def test_a_completion_without_a_ref_it_can_decide_is_a_400(
    gateway: Gateway, issuer: TestIssuer, watch_server: WatchServer, ref: Any
) -> None:
    params: dict[str, Any] = {"argument": {"name": "invoice", "value": "A"}}
    if ref is not None:
        params["ref"] = ref
    body = {"jsonrpc": "2.0", "id": 7, "method": "completion/complete", "params": params}
    headers = {
        "Authorization": f"Bearer {issuer.mint({'sub': 'alice'})}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
    }
    answer = httpx2.post(f"{gateway.url}/mcp/tools", json=body, headers=headers, timeout=5)
    assert answer.status_code == 400
    assert answer.json()["id"] == 7 and answer.json()["error"]["code"] == -32602
    assert watch_server.methods("completion/complete") == []


async def test_a_caller_listens_only_to_what_it_may_read(
    gateway: Gateway, issuer: TestIssuer, watch_server: WatchServer
) -> None:
    """MCP 2026-07-28 (SEP-2575): a `subscriptions/listen` is decided as a read of every URI it watches; one it may
    not read refuses the whole listen, on record, and nothing goes upstream."""
    async with client(gateway, issuer.mint({"sub": "alice"})) as mcp:
        async with mcp.listen(resource_subscriptions=[LATEST], tools_list_changed=True) as listening:
            assert listening.honored.resource_subscriptions == [LATEST]
        for uris in ([PAYROLL], [LATEST, ARCHIVE]):
            with pytest.raises(MCPError) as error:
                async with mcp.listen(resource_subscriptions=uris):
                    pass
            refused = uris[-1].replace(":", "%3A").replace("/", "%2F")
            refused_on_record(gateway, error.value, f"tools/resource:{refused}")
        async with mcp.listen(tools_list_changed=True):  # a listen that watches no resource has nothing to decide
            pass
    watched = [params["notifications"].get("resourceSubscriptions") for params in watch_server.methods(LISTEN)]
    assert watched == [[LATEST], None]


@pytest.mark.parametrize(
    "params",
    [
        None,
        [],
        {},
        {"notifications": True},
        {"notifications": {"resourceSubscriptions": PAYROLL}},
        {"notifications": {"resourceSubscriptions": [LATEST, 7]}},
        {"notifications": {"resourceSubscriptions": [""]}},
    ],
    ids=[
        "missing",
        "not-an-object",
        "no-filter",
        "filter-not-an-object",
        "uris-not-a-list",
        "uri-not-a-string",
        "empty-uri",
    ],
)
def test_a_listen_whose_params_it_cannot_read_is_a_400(
    gateway: Gateway, issuer: TestIssuer, watch_server: WatchServer, params: Any
) -> None:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": 8, "method": LISTEN}
    if params is not None:
        body["params"] = params
    headers = {
        "Authorization": f"Bearer {issuer.mint({'sub': 'alice'})}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
    }
    answer = httpx2.post(f"{gateway.url}/mcp/tools", json=body, headers=headers, timeout=5)
    assert answer.status_code == 400
    assert answer.json()["id"] == 8 and answer.json()["error"]["code"] == -32602
    assert watch_server.methods(LISTEN) == []
