"""The built-in demo provider: deterministic answers, offline.

It answers chat requests by echoing the last user message, streams the same
answer word by word, and returns a tool call when the request offers tools
and either forces one (`tool_choice`) or the message names one. Embeddings are
unit vectors derived from a hash of each input. Same request, same answer.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from idgate.errors import BadRequest
from idgate.providers.base import Endpoint, Provider

__all__ = ["DemoProvider"]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class DemoProvider(Provider):
    def __init__(self, name: str = "demo", identity_field: str | None = "user") -> None:
        self.name = name
        self.identity_field = identity_field

    async def complete(self, endpoint: Endpoint, body: dict[str, Any], *, traceparent: str | None = None) -> bytes:
        if endpoint == "embeddings":
            return orjson.dumps(self._embeddings(body))
        return orjson.dumps(self._chat(body))

    async def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, traceparent: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        if endpoint != "chat/completions":
            raise BadRequest("only chat completions can be streamed")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest('`stream_options` must be an object, e.g. {"include_usage": true}')
        reply = self._chat(body)
        base = {
            "id": reply["id"],
            "object": "chat.completion.chunk",
            "created": reply["created"],
            "model": reply["model"],
        }
        message = reply["choices"][0]["message"]

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        yield event({"role": "assistant", "content": ""})
        if message.get("tool_calls"):
            calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            yield event({"tool_calls": calls})
        else:
            words = message["content"].split(" ")
            for i, word in enumerate(words):
                yield event({"content": word if i == 0 else " " + word})
        yield event({}, reply["choices"][0]["finish_reason"])
        if (options or {}).get("include_usage"):
            yield b"data: " + orjson.dumps({**base, "choices": [], "usage": reply["usage"]}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("`messages` must be a non-empty list")
        last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
        said = _text(last.get("content"))
        model = str(body.get("model", "demo"))
        digest = _digest(model, orjson.dumps(messages).decode())
        tool = self._tool_to_call(body, said)
        message: dict[str, Any]
        if tool is not None:
            call = {"id": f"call_{digest[:12]}", "type": "function", "function": {"name": tool, "arguments": "{}"}}
            message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": f"demo reply to: {said}".strip()}, "stop"
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages if isinstance(m, dict))
        completion_tokens = len((message.get("content") or "").split()) or 1
        return {
            "id": f"chatcmpl-demo-{digest[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @staticmethod
    def _tool_to_call(body: dict[str, Any], said: str) -> str | None:
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("`tools` must be a list")
        choice = body.get("tool_choice")
        forced: Any = None
        if isinstance(choice, dict):
            forced = choice.get("function")
            forced = forced.get("name") if isinstance(forced, dict) else None
            if not isinstance(forced, str):
                raise BadRequest('`tool_choice` must name a function: {"type": "function", "function": {"name": ...}}')
        elif choice is not None and choice not in ("none", "auto", "required"):
            raise BadRequest("`tool_choice` must be `none`, `auto`, `required` or name a function")
        names: list[str] = [
            t["function"]["name"]
            for t in tools or []
            if isinstance(t, dict)
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
        ]
        if not names:
            return None
        if choice == "none":
            return None
        if forced is not None:
            return forced if forced in names else None
        if choice == "required":
            return names[0]
        return next((n for n in names if n in said), None)

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else None
        if not inputs:
            raise BadRequest("`input` must be a string or a non-empty list")
        dims = body.get("dimensions", 16)
        if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= 1024:
            raise BadRequest("`dimensions` must be an integer from 1 to 1024")
        data = []
        for index, item in enumerate(inputs):
            seed = _digest(orjson.dumps(item).decode())
            values = [int(_digest(seed, str(i))[:8], 16) / 0xFFFFFFFF - 0.5 for i in range(dims)]
            norm = math.sqrt(sum(v * v for v in values)) or 1.0
            data.append({"object": "embedding", "index": index, "embedding": [v / norm for v in values]})
        tokens = sum(len(str(i).split()) for i in inputs)
        return {
            "object": "list",
            "data": data,
            "model": str(body.get("model", "demo")),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
