"""A fast OpenAI-compatible mock upstream for the benchmark.

A raw asyncio protocol speaking just enough HTTP/1.1 (keep-alive, pipelining,
``Content-Length`` and chunked request bodies) to answer

* ``POST .../chat/completions``: a fixed small chat completion with ``usage``, or,
  when the body has ``"stream": true``, an SSE stream of ``chat.completion.chunk``
  events ending with ``data: [DONE]``, sent with chunked transfer encoding;
* ``GET .../models``: a list with one model;
* ``GET /health``: ``ok``.

Every response is built once at start-up, so a request costs only the header
scan: one core serves well over 100k requests/s and never limits a gateway.

Run: ``python bench/mock_upstream.py --port 0`` prints ``READY <port>`` once
listening, and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
from dataclasses import dataclass
from typing import cast

STREAM_EVENTS = 20
MODEL = "mock-model"
CREATED = 1_700_000_000
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_USAGE = {"prompt_tokens": 9, "completion_tokens": STREAM_EVENTS, "total_tokens": 9 + STREAM_EVENTS}


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: ".encode()
        + content_type
        + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode()
    )
    return head + body


def _completion_body() -> bytes:
    return _dumps(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the mock upstream."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _USAGE,
        }
    )


def _chunk(delta: dict[str, str], finish: str | None) -> dict[str, object]:
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _stream_response(include_usage: bool) -> bytes:
    """The whole SSE answer, one HTTP chunk per event."""
    events: list[dict[str, object]] = [_chunk({"role": "assistant", "content": ""}, None)]
    events += [_chunk({"content": f"tok{i} "}, None) for i in range(STREAM_EVENTS - 2)]
    events.append(_chunk({}, "stop"))
    if include_usage:
        events.append({**_chunk({}, None), "choices": [], "usage": _USAGE})
    payloads = [b"data: " + _dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads)
    return head + chunks + b"0\r\n\r\n"


@dataclass(frozen=True)
class Responses:
    completion: bytes
    stream: bytes
    stream_with_usage: bytes
    models: bytes
    health: bytes
    not_found: bytes
    bad_request: bytes

    @classmethod
    def build(cls) -> Responses:
        models = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}
        return cls(
            completion=_response("200 OK", b"application/json", _completion_body()),
            stream=_stream_response(include_usage=False),
            stream_with_usage=_stream_response(include_usage=True),
            models=_response("200 OK", b"application/json", _dumps(models)),
            health=_response("200 OK", b"text/plain", b"ok"),
            not_found=_response("404 Not Found", b"application/json", b'{"error":"not found"}'),
            bad_request=_response("400 Bad Request", b"text/plain", b"bad request"),
        )


class _NeedMore(Exception):
    """The buffer does not yet hold a whole request."""


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int]:
    """Decode a chunked body starting at `start`; return (body, end offset)."""
    body = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise _NeedMore
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                raise _NeedMore
            return bytes(body), end + 4
        if len(buf) < pos + size + 2:
            raise _NeedMore
        body += buf[pos : pos + size]
        pos += size + 2


class MockProtocol(asyncio.Protocol):
    """One connection: parse requests out of the buffer and answer each at once."""

    def __init__(self, responses: Responses) -> None:
        self._r = responses
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        out: list[bytes] = []
        close = False
        while not close:
            try:
                reply, close, used = self._one_request()
            except _NeedMore:
                break
            except ValueError:
                reply, close, used = self._r.bad_request, True, len(self._buf)
            out.append(reply)
            del self._buf[:used]
        transport = self._transport
        if transport is None:
            return
        if out:
            transport.write(b"".join(out))
        if close:
            transport.close()

    def _one_request(self) -> tuple[bytes, bool, int]:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            raise _NeedMore
        head = bytes(buf[:end]).lower()
        line_end = head.find(b"\r\n")
        request_line = head if line_end < 0 else head[:line_end]
        method, path, version = request_line.split(b" ", 2)
        close = b"\r\nconnection: close" in head or version == b"http/1.0"
        body_start = end + 4
        if b"\r\ntransfer-encoding: chunked" in head:
            body, used = _dechunk(buf, body_start)
        else:
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                value_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : value_end if value_end >= 0 else None])
            used = body_start + length
            if len(buf) < used:
                raise _NeedMore
            body = bytes(buf[body_start:used])
        return self._route(method, path, body), close, used

    def _route(self, method: bytes, path: bytes, body: bytes) -> bytes:
        path = path.split(b"?", 1)[0]
        if method == b"post" and path.endswith(b"/chat/completions"):
            if _STREAM_TRUE.search(body) is None:
                return self._r.completion
            if _INCLUDE_USAGE.search(body) is None:
                return self._r.stream
            return self._r.stream_with_usage
        if method == b"get" and path.endswith(b"/models"):
            return self._r.models
        if method == b"get" and path == b"/health":
            return self._r.health
        return self._r.not_found


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    responses = Responses.build()
    server = await loop.create_server(lambda: MockProtocol(responses), host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
