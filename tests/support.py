"""Real servers on loopback for the tests: a token issuer, an upstream, the gateway.

Each runs in its own thread with its own event loop and is stopped by the
fixture that started it. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import psycopg
import uvicorn
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from psycopg import sql

from idgate.app import IdgateApp, build_app
from idgate.audit.records import action_record, stories
from idgate.audit.writer import read_records
from idgate.config import Config, parse_config, with_listen

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(_cancel_all(), timeout=5)  # e.g. a handler still sleeping for a client that left
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class AiohttpServer:
    """An aiohttp web application served on a free loopback port."""

    def __init__(self, app: web.Application) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._app = app
        self._loop = LoopThread()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        self._loop.run(self._start())

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        self._loop.run(self._runner.cleanup())
        self._loop.stop()


class TestIssuer:
    """An OIDC-style issuer: discovery document and JWKS over HTTP, tokens on demand."""

    __test__ = False

    def __init__(self, algorithm: str = "RS256") -> None:
        self.algorithm = algorithm
        self.keys: list[RSAKey | ECKey] = [self._new_key()]
        self.jwks_requests = 0
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self.server = AiohttpServer(app)
        self.issuer = self.server.url
        self.jwks_uri = f"{self.server.url}/jwks"

    def _new_key(self) -> RSAKey | ECKey:
        key: RSAKey | ECKey
        if self.algorithm.startswith("ES"):
            key = ECKey.generate_key("P-256", parameters={"use": "sig"})
        else:
            key = RSAKey.generate_key(2048, parameters={"use": "sig"})
        key.ensure_kid()
        return key

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.issuer, "jwks_uri": self.jwks_uri})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_requests += 1
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.keys]})

    def rotate(self, keep_old: bool = False) -> None:
        """A new current key; the old one stays published only if `keep_old`."""
        new = self._new_key()
        self.keys = [new, *self.keys] if keep_old else [new]

    def mint(
        self,
        claims: dict[str, Any] | None = None,
        *,
        key: RSAKey | ECKey | None = None,
        header: dict[str, Any] | None = None,
        ttl: int = 300,
        audience: str | list[str] = "idgate-test",
    ) -> str:
        now = int(time.time())
        key = key or self.keys[0]
        body = {"iss": self.issuer, "sub": "alice", "aud": audience, "iat": now, "exp": now + ttl, "tenant": "acme"}
        body.update(claims or {})
        head = {"alg": self.algorithm, "kid": key.kid, "typ": "JWT", **(header or {})}
        return jwt.encode(head, {k: v for k, v in body.items() if v is not None}, key)

    def stop(self) -> None:
        self.server.stop()


@dataclass
class Upstream:
    """An OpenAI-compatible upstream that records what reached it.

    `mode` picks its behaviour: "ok", "error500", "slow" (sleeps `delay`),
    "cut" (a stream that breaks off after two events), "hang-stream" (sends
    one event, then nothing), "drip" (a stream of one event every 50 ms for
    `delay` seconds; `abandoned` is set if the reader leaves), "redirect" (a
    307 to another URL, which answers normally), or "errorNNN" for any other status: an
    OpenAI-shaped error body with that status (e.g. "error400", "error401").
    """

    mode: str = "ok"
    delay: float = 5.0
    received: list[dict[str, Any]] = field(default_factory=list)
    abandoned: threading.Event = field(default_factory=threading.Event)  # "drip": the reader went away
    server: AiohttpServer | None = None
    on_request: Callable[[dict[str, Any]], None] | None = None  # sees each body as it arrives (before answering)

    def start(self) -> Upstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self.server = AiohttpServer(app)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"{self.server.url}/v1"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body: dict[str, Any] = orjson.loads(await request.read())
        self.received.append({"headers": dict(request.headers), "body": body})
        if self.on_request is not None:
            self.on_request(body)
        return body

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if self.mode == "redirect" and "moved" not in request.query:
            # Somewhere else (here, the same route, marked): a gateway must not follow.
            raise web.HTTPTemporaryRedirect(f"{self.url}/chat/completions?moved=1")
        if self.mode == "error500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.mode == "error400-huge":
            return web.Response(status=400, body=b"x" * (2 * 1024 * 1024), content_type="application/json")
        if self.mode.startswith("error"):
            status = int(self.mode.removeprefix("error"))
            headers = {"Retry-After": "7"} if status == 429 else None
            return web.json_response(upstream_error_body(status), status=status, headers=headers)
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if self.mode == "rogue-tool":
            return await self._rogue_tool(request, body)
        if body.get("stream"):
            return await self._stream(request, body)
        return web.json_response(_completion(body))

    async def _rogue_tool(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """A model that calls `delete_account`, whatever it was offered (streamed in two chunks)."""
        call = {"id": "call_1", "type": "function", "function": {"name": "delete_account", "arguments": "{}"}}
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            completion = {
                **_completion(body),
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            }
            return web.json_response(completion)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        delta = {"tool_calls": [{"index": 0, **call}]}
        event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        data = b"data: " + orjson.dumps({**event, "choices": [{"index": 0, "delta": delta}]}) + b"\n\n"
        await response.write(data[:40])  # the event spans two chunks
        await asyncio.sleep(0.01)
        await response.write(data[40:] + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if self.mode == "drip":
            return await self._drip(response, body)
        words = ["the", "upstream", "says", "hello"]
        for i, word in enumerate(words):
            chunk = {
                "id": "chatcmpl-up",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": (" " if i else "") + word}, "finish_reason": None}],
            }
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if i == 1 and self.mode == "cut":
                assert request.transport is not None
                request.transport.close()  # the connection dies mid-stream
                return response
            if i == 0 and self.mode == "hang-stream":
                await asyncio.sleep(self.delay)
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        final = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        await response.write(b"data: " + orjson.dumps({**final, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _drip(self, response: web.StreamResponse, body: dict[str, Any]) -> web.StreamResponse:
        """A long generation: one event every 50 ms for `delay` seconds, unless the reader goes away."""
        deadline = time.monotonic() + self.delay
        try:
            while time.monotonic() < deadline:
                delta = {"index": 0, "delta": {"content": "."}, "finish_reason": None}
                chunk = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "model": body["model"]}
                await response.write(b"data: " + orjson.dumps({**chunk, "choices": [delta]}) + b"\n\n")
                await asyncio.sleep(0.05)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            self.abandoned.set()
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
                "model": body["model"],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )


def upstream_error_body(status: int) -> dict[str, Any]:
    """What the upstream says in mode "errorNNN"."""
    return {
        "error": {
            "message": f"upstream refused this request with {status}",
            "type": "invalid_request_error",
            "param": "messages",
            "code": f"upstream_code_{status}",
        }
    }


def _completion(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1,
        "model": body["model"],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "upstream says hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }


class Gateway:
    """idgate itself, under uvicorn on a free port, in a thread."""

    def __init__(self, config: dict[str, Any] | Config, home: Path, env: dict[str, str] | None = None) -> None:
        """`config` is YAML-like data (served with audience `idgate-test`), or a loaded `Config` as is."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if isinstance(config, Config):
            self.config = with_listen(config, "127.0.0.1", self.port)
        else:
            server = {"port": self.port, "audiences": ["idgate-test"], **config.get("server", {})}
            self.config = parse_config({**config, "server": server}, {"IDGATE_HOME": str(home), **(env or {})})
        self.app: IdgateApp = build_app(self.config)
        server_config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, lifespan="on", access_log=False, log_level="warning"
        )
        self.server = uvicorn.Server(server_config)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)

    def _serve(self) -> None:
        # uvicorn exits the process (SystemExit) when start-up fails; here it ends the thread.
        with contextlib.suppress(SystemExit):
            self.server.run()

    def raw_records(self) -> list[dict[str, Any]]:
        """The audit records written so far (after letting the writer catch up), as stored."""
        self.app.audit.flush()
        return read_records(self.config.audit_path)

    def records(self) -> list[dict[str, Any]]:
        """One merged view per request (`idgate.audit.records.stories`) of the records written so far."""
        return stories(self.raw_records())

    def record(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """A request's records merged into one view, once it has ended (a stream's end comes after its last byte)."""
        found: list[dict[str, Any]] = []

        def written() -> bool:
            found[:] = [r for r in self.records() if r["request_id"] == request_id]
            return bool(found) and "status" in found[0]

        wait_for(written, timeout)
        assert len(found) == 1, found
        return found[0]

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)


# PostgreSQL for the stores' tests (trust auth, database `test`); each test works in a schema of its own.
PG_DSN = os.environ.get("IDGATE_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")


def unique_schema(prefix: str = "idgate_test") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def drop_schema(schema: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def break_audit_trail(gateway: Gateway) -> None:
    """Take the SQLite trail's table away under the writer and give it a record to move: the store fails.

    (A call's own records would do too, but they are durable in the commit journal first, so that
    call may go through: `tests/audit/test_journal.py` has that half.)
    """
    assert gateway.app.audit.flush()
    connection = sqlite3.connect(gateway.config.audit_path)
    try:
        connection.execute("DROP TABLE audit_records")
        connection.commit()
    finally:
        connection.close()
    gateway.app.audit.emit(action_record("test-break", None, None, "config_loaded", "test", "ok", {}))
    wait_for(lambda: not gateway.app.audit.healthy)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def raw_request(
    url: str,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> RawResponse:
    """One HTTP/1.1 request with the standard library, bytes and headers exactly as sent and received.

    A `body` given as an iterable of chunks goes out with `Transfer-Encoding: chunked`.
    """
    parsed = urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return RawResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()
