"""The official openai SDK through idgate, to a real local upstream."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support import Gateway, TestIssuer, Upstream


def sdk(gateway: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0)


def test_sync_chat_reaches_upstream_with_pseudonym_not_token(
    gateway: Gateway, issuer: TestIssuer, upstream: Upstream
) -> None:
    token = issuer.mint({"sub": "alice"})
    with sdk(gateway, token) as client:
        reply = client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
            tool_choice="auto",
            response_format={"type": "text"},
            extra_body={"vendor_knob": 7},
        )
        assert reply.choices[0].message.content == "upstream says hi"
        seen = upstream.received[-1]
        assert seen["body"]["model"] == "real-model"
        assert seen["body"]["tools"][0]["function"]["name"] == "lookup"
        assert seen["body"]["tool_choice"] == "auto"
        assert seen["body"]["response_format"] == {"type": "text"}
        assert seen["body"]["vendor_knob"] == 7
        assert seen["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert token not in str(seen)
        pseudonym = seen["body"]["user"]
        assert pseudonym.startswith("idg_") and "alice" not in pseudonym
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "again"}], user="bob")
        assert upstream.received[-1]["body"]["user"] == pseudonym  # stable, and not the caller's claim


async def test_async_and_streaming(gateway: Gateway, issuer: TestIssuer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=issuer.mint(), max_retries=0) as client:
        reply = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        assert reply.usage is not None and reply.usage.total_tokens == 6
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "the upstream says hello"
    records = gateway.records()
    assert [r["stream"] for r in records] == [False, True]
    assert records[1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert records[1]["first_byte_ms"] is not None


def test_sync_streaming_and_embeddings(gateway: Gateway, issuer: TestIssuer) -> None:
    with sdk(gateway, issuer.mint()) as client:
        with client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "the upstream says hello"
        embedding = client.embeddings.create(model="embed-test", input="hello")
        assert embedding.data[0].embedding == [0.6, 0.8]


def test_models_lists_only_what_the_caller_may_use(gateway: Gateway, issuer: TestIssuer) -> None:
    with sdk(gateway, issuer.mint({"tenant": "acme"})) as acme, sdk(gateway, issuer.mint({"tenant": "beta"})) as beta:
        assert sorted(m.id for m in acme.models.list()) == ["embed-test", "gpt-test"]
        assert sorted(m.id for m in beta.models.list()) == ["beta-only", "embed-test", "gpt-test"]
        with pytest.raises(openai.PermissionDeniedError) as refused:
            acme.chat.completions.create(model="beta-only", messages=[{"role": "user", "content": "hi"}])
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "forbidden" and error["decision_id"].startswith("dec_")


def test_unknown_model_is_404(gateway: Gateway, issuer: TestIssuer) -> None:
    with (
        sdk(gateway, issuer.mint()) as client,
        pytest.raises(openai.NotFoundError, match="model `nope` does not exist"),
    ):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_retrieve_a_model_only_if_visible(gateway: Gateway, issuer: TestIssuer) -> None:
    with sdk(gateway, issuer.mint({"tenant": "acme"})) as client:
        assert client.models.retrieve("gpt-test").id == "gpt-test"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("beta-only")  # exists, but not for acme: no existence leak
