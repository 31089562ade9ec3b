"""The text a request carries to a model: what the detectors read.

Only the fields idgate acts on are looked at; anything else passes through
untouched. Read are:

- chat completions `messages`: `content` as a string or a list of parts (each
  part's `text`, and `refusal`), assistant `tool_calls[].function.arguments`
  (and custom tool `input`), the legacy `function_call.arguments`, and tool
  results (a `tool` message's content);
- embeddings and Responses API `input`: a string, a list of strings, or a list
  of items read like messages (plus `arguments` and `output` of function-call
  items); Responses API `instructions`; legacy completions `prompt`.

Not read: token-id arrays (no text to scan) and binary parts (images, audio,
files), which would need decoding first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["texts_of"]


def texts_of(body: Mapping[str, Any]) -> list[str]:
    """Every text of an OpenAI-style request body that goes to the model, in order."""
    out: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                _message(message, out)
    for key in ("input", "prompt"):
        value = body.get(key)
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    out.append(item)
                elif isinstance(item, dict):
                    _message(item, out)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        out.append(instructions)
    return out


def _message(message: Mapping[str, Any], out: list[str]) -> None:
    _content(message.get("content"), out)
    for key in ("refusal", "arguments"):  # `arguments`: a Responses API function_call item
        value = message.get(key)
        if isinstance(value, str):
            out.append(value)
    _content(message.get("output"), out)  # a Responses API function_call_output item
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            if isinstance(call, dict):
                _call(call.get("function"), "arguments", out)
                _call(call.get("custom"), "input", out)
    _call(message.get("function_call"), "arguments", out)


def _call(call: object, key: str, out: list[str]) -> None:
    if isinstance(call, dict):
        value = call.get(key)
        if isinstance(value, str):
            out.append(value)


def _content(content: object, out: list[str]) -> None:
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                for key in ("text", "refusal"):
                    value = part.get(key)
                    if isinstance(value, str):
                        out.append(value)
