"""The embedded default profile, as `idgate serve` runs it, through the official openai SDK."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionToolChoiceOptionParam, ChatCompletionToolParam

from idgate.config import default_config
from idgate.identity.devissuer import DevIssuer
from tests.conftest import MakeGateway
from tests.support import Gateway, raw_request

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CLOCK: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture
def demo(make_gateway: MakeGateway, tmp_path: Path) -> Gateway:
    return make_gateway(default_config({"IDGATE_HOME": str(tmp_path / "state")}))


@pytest.fixture
def client(demo: Gateway) -> Iterator[openai.OpenAI]:
    token = DevIssuer(demo.config).mint("alice")
    with openai.OpenAI(base_url=f"{demo.url}/v1", api_key=token, max_retries=0, timeout=10) as sdk:
        yield sdk


@pytest.fixture
async def async_client(demo: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    token = DevIssuer(demo.config).mint("bob", actors=("planner",), task="task-1")  # the demo policy: a human's task
    async with openai.AsyncOpenAI(base_url=f"{demo.url}/v1", api_key=token, max_retries=0, timeout=10) as sdk:
        yield sdk


def test_the_default_lists_its_demo_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert sorted(models) == ["demo-chat", "demo-chat-mini", "demo-embed"]
    assert {m.owned_by for m in models.values()} == {"demo"}


def test_chat_is_deterministic(client: openai.OpenAI, demo: Gateway) -> None:
    def ask(text: str, model: str = "demo-chat") -> tuple[str, str | None]:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.total_tokens > 0
        return reply.id, reply.choices[0].message.content

    first = ask("hello there")
    assert first[1] == "demo reply to: hello there"
    assert ask("hello there") == first
    assert ask("something else")[0] != first[0]
    assert ask("hello there", "demo-chat-mini")[0] != first[0]

    record = demo.records()[-1]
    assert record["provider"] == "demo" and record["model"] == "demo-chat-mini" and record["outcome"] == "ok"
    assert record["subject"]["id"] == "alice" and record["subject"]["tenant"] == "demo"
    assert record["credential"]["kind"] == "dev"


def test_chat_streams_the_same_answer_word_by_word(client: openai.OpenAI) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "stream me a reply"},
    ]
    whole = client.chat.completions.create(model="demo-chat", messages=messages)
    with client.chat.completions.create(
        model="demo-chat", messages=messages, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == ["demo", " reply", " to:", " stream", " me", " a", " reply"]
    assert "".join(pieces) == whole.choices[0].message.content
    assert {c.id for c in chunks} == {whole.id}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage


@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "get_weather"}}, "required"],
)
def test_a_forced_tool_choice_gets_a_tool_call(
    client: openai.OpenAI, tool_choice: ChatCompletionToolChoiceOptionParam
) -> None:
    reply = client.chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "what is it like outside?"}],
        tools=[WEATHER, CLOCK],
        tool_choice=tool_choice,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.function.arguments == "{}" and call.id.startswith("call_")


def test_tools_without_a_forced_choice_answer_in_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "just chat"}], tools=[WEATHER], tool_choice="auto"
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == "demo reply to: just chat"
    reply = client.chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "get_time please"}],
        tools=[WEATHER],
        tool_choice="none",
    )
    assert reply.choices[0].message.tool_calls is None


def test_a_streamed_tool_call(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="demo-chat",
        messages=[{"role": "user", "content": "what time is it?"}],
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        stream=True,
    ) as stream:
        chunks = [c for c in stream if c.choices]
    calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function is not None and calls[0].function.name == "get_time"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_embeddings_are_deterministic_unit_vectors(client: openai.OpenAI) -> None:
    first = client.embeddings.create(model="demo-embed", input="hello")
    again = client.embeddings.create(model="demo-embed", input="hello")
    vector = first.data[0].embedding
    assert vector == again.data[0].embedding
    assert len(vector) == 16 and math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-9)

    batch = client.embeddings.create(model="demo-embed", input=["hello", "world"], dimensions=64)
    assert [d.index for d in batch.data] == [0, 1]
    assert all(len(d.embedding) == 64 for d in batch.data)
    assert all(math.isclose(math.fsum(v * v for v in d.embedding), 1.0, rel_tol=1e-9) for d in batch.data)
    assert batch.data[0].embedding != batch.data[1].embedding
    assert batch.usage.total_tokens == 2


def test_a_chat_model_is_not_an_embedding_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="is not an embedding model"):
        client.embeddings.create(model="demo-chat", input="hello")
    with pytest.raises(openai.NotFoundError, match="is not a chat model"):
        client.chat.completions.create(model="demo-embed", messages=[{"role": "user", "content": "hi"}])


def test_demo_refuses_a_chat_without_messages(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="`messages` must be a non-empty list"):
        client.chat.completions.create(model="demo-chat", messages=[])


async def test_async_agent_chain_is_served_and_recorded(async_client: openai.AsyncOpenAI, demo: Gateway) -> None:
    reply = await async_client.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "on behalf of bob"}]
    )
    assert reply.choices[0].message.content == "demo reply to: on behalf of bob"
    stream = await async_client.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "on behalf of bob"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == reply.choices[0].message.content
    record = demo.record(stream.response.headers["x-request-id"])
    assert record["stream"] is True and record["outcome"] == "ok"
    assert record["subject"]["id"] == "bob" and record["subject"]["kind"] == "human"
    assert record["credential"]["task"] == "task-1"
    assert [a["id"] for a in record["actors"]] == ["planner"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"stream": True, "stream_options": "yes"}, "`stream_options` must be an object"),
        ({"tools": "get_time"}, "`tools` must be a list"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": "get_weather"}}, "must name a function"),
        ({"tools": [WEATHER], "tool_choice": 3}, "`tool_choice` must be"),
    ],
)
def test_demo_refuses_malformed_fields_with_a_400(demo: Gateway, extra: dict[str, object], says: str) -> None:
    token = DevIssuer(demo.config).mint("alice")
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], **extra}
    response = raw_request(
        demo.url, "POST", "/v1/chat/completions", orjson.dumps(body), {"Authorization": f"Bearer {token}"}
    )
    assert response.status == 400, response.body
    assert response.json()["error"]["code"] == "invalid_request" and says in response.json()["error"]["message"]


def test_demo_reads_only_the_text_parts_of_a_message(client: openai.OpenAI) -> None:
    parts: list[Any] = [{"type": "text", "text": "look"}, {"type": "image_url"}, {"type": "text", "text": 5}]
    reply = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": parts}])
    assert reply.choices[0].message.content == "demo reply to: look"
    with pytest.raises(openai.BadRequestError, match="`dimensions`"):
        client.embeddings.create(model="demo-embed", input="x", extra_body={"dimensions": True})
