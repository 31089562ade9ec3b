"""The little HTTP layer the gateway needs, on raw ASGI.

Raw ASGI keeps the hot path short (DESIGN.md measures Starlette at about twice
uvicorn's own cost per request). This module reads requests (bounded bodies)
and writes responses (JSON, errors in OpenAI's shape, SSE); nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import orjson

from idgate.errors import (
    AuthenticationError,
    IdgateError,
    InvalidToken,
    MalformedJSON,
    MethodNotAllowed,
    PayloadTooLarge,
)
from idgate.ids import random_hex

__all__ = [
    "Receive",
    "Request",
    "Scope",
    "Send",
    "error_payload",
    "new_request_id",
    "send_bytes",
    "send_error",
    "send_json",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"


def new_request_id() -> str:
    """`req_` + 12 hex digits of the time in ms + 12 random: unique, and sorted by time.

    why: the audit trail indexes records by request id; random ids put every insert on a random
    index page, which made each record ~3x as costly to store (37 vs 11 us, bench/audit_bench.py).
    """
    return f"req_{time.time_ns() // 1_000_000:012x}{random_hex(6)}"


class Request:
    """One incoming HTTP request: its scope, headers and (bounded) body."""

    __slots__ = ("_headers", "id", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.id = new_request_id()
        self._headers: dict[bytes, bytes] | None = None

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    def header(self, name: bytes) -> bytes | None:
        if self._headers is None:
            # Later duplicates do not override the first: one credential per request.
            headers: dict[bytes, bytes] = {}
            for key, value in self.scope["headers"]:
                headers.setdefault(key.lower(), value)
            self._headers = headers
        return self._headers.get(name)

    async def body(self, limit: int) -> bytes:
        """The whole body; more than `limit` bytes is a `PayloadTooLarge`."""
        declared = self.header(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            except ValueError:
                raise MalformedJSON("`content-length` is not a number") from None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise MalformedJSON("the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json_object(self, limit: int) -> dict[str, Any]:
        raw = await self.body(limit)
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MalformedJSON(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
        if not isinstance(value, dict):
            raise MalformedJSON("request body must be a JSON object")
        return value


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    content_type: bytes = JSON,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    headers: Headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, payload: Any, request_id: str) -> None:
    await send_bytes(send, status, orjson.dumps(payload), request_id)


def error_payload(error: IdgateError, request_id: str, decision_id: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, plus the request id and (for refusals) the decision id."""
    body: dict[str, Any] = {"message": error.message, "type": error.type, "code": error.code, "param": None}
    body["request_id"] = request_id
    if decision_id is not None:
        body["decision_id"] = decision_id
    return {"error": body}


def _challenge(error: AuthenticationError) -> bytes:
    challenge = f'{error.scheme} realm="idgate"'
    if error.resource_metadata:
        challenge += f', resource_metadata="{error.resource_metadata}"'
    if isinstance(error, InvalidToken):
        # Messages can quote token contents: keep the header to safe printable ASCII.
        description = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in error.message)
        challenge += f', error="{error.code}", error_description="{description}"'
    if error.challenge_params:
        challenge += f", {error.challenge_params}"
    return challenge.encode()


async def send_error(send: Send, error: IdgateError, request_id: str, decision_id: str | None = None) -> None:
    extra: Headers = []
    if isinstance(error, AuthenticationError):
        extra.append((b"www-authenticate", _challenge(error)))
        extra.extend(error.headers)
    elif isinstance(error, MethodNotAllowed):
        extra.append((b"allow", ", ".join(error.allowed).encode()))
    await send_bytes(
        send, error.status, orjson.dumps(error_payload(error, request_id, decision_id)), request_id, extra=extra
    )
