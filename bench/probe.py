"""A small HTTP/1.1 client on raw asyncio protocols: smoke checks and TTFB.

`ttfb_run` keeps N keep-alive connections busy for a bounded number of
requests (and a bounded time) and measures, per request, the time from
writing it to the first byte of the response *body* (for a stream: the first
SSE bytes, not just the headers) and to its end.

`fetch` sends one request and returns the decoded answer, used to check that a
target answers properly before it is measured.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit


class ProbeError(RuntimeError):
    pass


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    first_byte: float = 0.0  # perf_counter() at the first body byte
    end: float = 0.0  # perf_counter() at the end of the body


class _Parser:
    """Incremental HTTP/1.1 response parser (Content-Length or chunked bodies)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.answer = Answer()
        self._in_body = False
        self._length: int | None = None
        self._chunked = False
        self._chunk_left = -1  # bytes left in the current chunk; -1: expect a size line

    def feed(self, data: bytes, now: float) -> bool:
        """Take `data`; True once the response is complete."""
        self.buf += data
        if not self._in_body:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            self._head(bytes(self.buf[:end]))
            del self.buf[: end + 4]
            self._in_body = True
        if self.buf and not self.answer.first_byte:
            self.answer.first_byte = now
        done = self._body_chunked() if self._chunked else self._body_plain()
        if done:
            self.answer.end = now
            self.answer.first_byte = self.answer.first_byte or now
        return done

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.answer.status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.answer.headers[name.strip().lower()] = value.strip()
        headers = self.answer.headers
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not self._chunked:
            self._length = int(headers.get("content-length", "0"))

    def _body_plain(self) -> bool:
        assert self._length is not None
        if len(self.buf) < self._length:
            return False
        self.answer.body = bytes(self.buf[: self._length])
        del self.buf[: self._length]
        return True

    def _body_chunked(self) -> bool:
        while True:
            if self._chunk_left < 0:
                eol = self.buf.find(b"\r\n")
                if eol < 0:
                    return False
                size = int(bytes(self.buf[:eol]).split(b";", 1)[0], 16)
                if size == 0:
                    end = self.buf.find(b"\r\n\r\n", eol)  # past any trailers
                    if end < 0:
                        return False
                    del self.buf[: end + 4]
                    return True
                del self.buf[: eol + 2]
                self._chunk_left = size
            if len(self.buf) < self._chunk_left + 2:
                return False
            self.answer.body += bytes(self.buf[: self._chunk_left])
            del self.buf[: self._chunk_left + 2]
            self._chunk_left = -1


class _Client(asyncio.Protocol):
    """One keep-alive connection; `request` sends one request and awaits its answer."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser: _Parser | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        self._lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        parser, waiter = self._parser, self._waiter
        if parser is None or waiter is None or waiter.done():
            return
        try:
            complete = parser.feed(data, now)
        except (ValueError, IndexError) as exc:
            waiter.set_exception(ProbeError(f"unparseable response: {exc}"))
            return
        if complete:
            waiter.set_result(parser.answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("connection closed by the server")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ProbeError(str(self._lost)))

    async def request(self, raw: bytes) -> tuple[float, Answer]:
        if self._transport is None or self._lost is not None:
            raise ProbeError("connection is closed")
        self._parser = _Parser()
        self._waiter = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        self._transport.write(raw)
        return start, await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def build_request(url: str, body: bytes, headers: Mapping[str, str]) -> tuple[str, int, bytes]:
    """(host, port, raw request bytes) for POST `url`."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ProbeError(f"only http:// URLs are supported, not {url!r}")
    port = parts.port or 80
    path = parts.path or "/"
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {parts.hostname}:{port}",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return parts.hostname, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connect(host: str, port: int) -> _Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(_Client, host, port)
    return client


async def fetch(url: str, body: bytes, headers: Mapping[str, str], limit_s: float = 30.0) -> Answer:
    host, port, raw = build_request(url, body, headers)
    client = await asyncio.wait_for(_connect(host, port), limit_s)
    try:
        _, answer = await asyncio.wait_for(client.request(raw), limit_s)
        return answer
    finally:
        client.close()


@dataclass(frozen=True)
class TtfbResult:
    requests: int
    errors: int
    first_error: str
    ttfb_ms: list[float]
    total_ms: list[float]


async def ttfb_run(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    concurrency: int,
    max_requests: int,
    seconds: float,
    accept: Callable[[Answer], str | None],
    limit_s: float = 30.0,
) -> TtfbResult:
    """Keep `concurrency` connections busy until `max_requests` or `seconds` run out.

    `accept` returns None for a good answer, or why it is not good; `limit_s` bounds each request.
    """
    host, port, raw = build_request(url, body, headers)
    clients = await asyncio.gather(*(_connect(host, port) for _ in range(concurrency)))
    ttfb: list[float] = []
    total: list[float] = []
    errors: list[str] = []
    budget = max_requests
    deadline = time.perf_counter() + seconds

    async def worker(client: _Client) -> None:
        nonlocal budget
        while budget > 0 and time.perf_counter() < deadline:
            budget -= 1
            try:
                start, answer = await asyncio.wait_for(client.request(raw), limit_s)
            except (TimeoutError, ProbeError, OSError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            problem = accept(answer)
            if problem is not None:
                errors.append(problem)
                continue
            ttfb.append((answer.first_byte - start) * 1e3)
            total.append((answer.end - start) * 1e3)

    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        for client in clients:
            client.close()
    return TtfbResult(
        requests=len(ttfb),
        errors=len(errors),
        first_error=errors[0] if errors else "",
        ttfb_ms=ttfb,
        total_ms=total,
    )


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of `values` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]
