"""A GET's event stream is cut into events in time linear in the bytes received, however its chunks fall: a long
event in small chunks once cost time quadratic in its size. The events are the ones the gateway always cut."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator

import httpx2
import pytest
from aiohttp import web
from aiohttp.payload import AsyncIterablePayload

from idgate.mcp.gateway import _EventSplitter
from tests.mcp import test_list_filtering as listing
from tests.mcp.test_list_filtering import Lister, MakeListGateway
from tests.support import Gateway, TestIssuer

# why: the list fixtures (gateway, raw upstream) are the ones `test_list_filtering` defines, shared as they are.
lister, make_list_gateway = listing.lister, listing.make_list_gateway

LIMIT = 8 * 1024 * 1024  # `max_response_bytes` by default
NOTE = b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}'


class QuadraticSplitter:
    """The cutting the gateway did before, kept to compare with: the whole unfinished event normalised and split
    again on every chunk. `scanned` counts the bytes it looked at, as `_EventSplitter` counts them."""

    def __init__(self) -> None:
        self._pending = b""
        self.scanned = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def feed(self, chunk: bytes) -> list[bytes]:
        pending = self._pending + chunk
        held = b"\r" if pending.endswith(b"\r") else b""
        text = pending[: len(pending) - len(held)].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self.scanned += 2 * len(text)  # normalised, then split
        *blocks, rest = text.split(b"\n\n")
        self._pending = rest + held
        return blocks


def cut(chunks: list[bytes]) -> tuple[list[bytes], int]:
    splitter = _EventSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    return events, splitter.pending


@pytest.mark.parametrize(
    ("chunks", "events", "pending"),
    [
        pytest.param([b"data: a\r", b"\ndata: b\r\n\r", b"\n"], [b"data: a\ndata: b"], 0, id="CRLF split"),
        pytest.param([b"data: a\rdata: b\r", b"\r", b"data: c\r\rid"], [b"data: a\ndata: b", b"data: c"], 2, id="CR"),
        pytest.param([b"data: a\n\ndata: b\n", b"\n"], [b"data: a", b"data: b"], 0, id="LF"),
        pytest.param([b"data: a\n", b"\ndata: b\r\n", b"\r\n"], [b"data: a", b"data: b"], 0, id="separator split"),
        pytest.param([b"id: 1\n\n: ping\n\ndata: x\n\ndata: y"], [b"id: 1", b": ping", b"data: x"], 7, id="several"),
        pytest.param([bytes([c]) for c in b"id: 7\r\ndata: long\r\n\r\n"], [b"id: 7\ndata: long"], 0, id="bytewise"),
        pytest.param([b"\n\n\n", b"\n", b"\r", b"\r\r\n\n"], [b"", b"", b"", b""], 0, id="empty events"),
        pytest.param([b"data: a\n\n\n", b"data: b\n\n"], [b"data: a", b"\ndata: b"], 0, id="a third LF"),
        pytest.param([b"data: unfinished\r"], [], 17, id="held CR counted"),
        pytest.param([b"data: a\r", b"", b"\n\r\n"], [b"data: a"], 0, id="empty chunk"),
    ],
)
def test_events_are_cut_at_every_awkward_boundary(chunks: list[bytes], events: list[bytes], pending: int) -> None:
    assert cut(chunks) == (events, pending)
    before = QuadraticSplitter()
    assert [event for chunk in chunks for event in before.feed(chunk)] == events and before.pending == pending


def test_any_chunking_of_any_line_ends_cuts_the_events_as_before() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        stream = b"".join(rng.choice([b"data: x", b"id: 1", b"\r", b"\n", b"\r\n", b":", b""]) for _ in range(40))
        cuts = sorted(rng.sample(range(len(stream) + 1), rng.randint(0, min(12, len(stream) + 1))))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        before = QuadraticSplitter()
        expected = [event for chunk in chunks for event in before.feed(chunk)]
        assert cut(chunks) == (expected, before.pending), chunks


@pytest.mark.parametrize(
    "splitter", [_EventSplitter, pytest.param(QuadraticSplitter, marks=pytest.mark.xfail(strict=True))]
)
def test_a_long_event_in_small_chunks_costs_time_linear_in_its_size(
    splitter: type[_EventSplitter | QuadraticSplitter],
) -> None:
    # why: counted, not timed: each byte is looked at a few times, not once per chunk after it came.
    size, step = LIMIT - 1024, 4096
    event = b"data: " + b"x" * size
    events = splitter()
    for at in range(0, len(event), step):
        assert events.feed(event[at : at + step]) == []
        if events.scanned > 3 * len(event):
            break  # why: quadratic work would take seconds more to finish, and it fails already
    else:
        assert events.feed(b"\r\n\r\n") == [event]
    assert events.scanned <= 3 * len(event)


# -- through the gateway ------------------------------------------------------------------------


class ChunkedLister(Lister):
    """The raw upstream, its GET stream sent as `chunks`, each on its own after a pause (so each is read alone)."""

    chunks: list[bytes]

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            return await super()._handle(request)
        return web.Response(body=AsyncIterablePayload(self._sent()), content_type="text/event-stream")

    async def _sent(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
            await asyncio.sleep(0.02)


@pytest.fixture
def chunked_lister() -> Iterator[ChunkedLister]:
    server = ChunkedLister()
    yield server
    server.stop()


def get(gateway: Gateway, issuer: TestIssuer) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {issuer.mint({'sub': 'alice'})}", "Accept": "text/event-stream"}
    return httpx2.get(f"{gateway.url}/mcp/tools", headers=headers, timeout=10)


def test_a_stream_in_awkward_chunks_is_relayed_event_by_event(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, chunked_lister: ChunkedLister
) -> None:
    gateway = make_list_gateway(chunked_lister.url)
    chunked_lister.chunks = [
        b"id: 1\r",
        b"\nevent: message\r\ndata: " + NOTE[:10],
        NOTE[10:] + b"\r\n",
        b"\r\n: keep-alive\r\rid: 2\rdata: " + NOTE + b"\n",
        b"\nid: 3\ndata: " + NOTE + b"\n\nid: 4\n",
        b"data:\n\ndata: unfinished, dropped",
    ]
    got = get(gateway, issuer)
    assert got.status_code == 200
    assert got.content == (
        b"id: 1\nevent: message\ndata: " + NOTE + b"\n\n:\n\nid: 2\ndata: " + NOTE + b"\n\n"
        b"id: 3\ndata: " + NOTE + b"\n\nid: 4\ndata:\n\n"
    )


def test_an_event_over_the_limit_ends_the_stream(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, lister: Lister
) -> None:
    gateway = make_list_gateway(lister.url)
    # why: the limit holds for what is unfinished when a chunk has been read; an event ending in the chunk that
    # crosses it passes. 2 MiB over it is more than one read ever holds (aiohttp stops reading at 512 KiB unread).
    over = b"data: " + b"x" * (LIMIT + 2 * 1024 * 1024)
    lister.stream = b"data: " + NOTE + b"\r\n\r\n" + over + b"\r\n\r\ndata: " + NOTE + b"\r\n\r\n"
    got = get(gateway, issuer)
    assert got.status_code == 200 and got.content == b"data: " + NOTE + b"\n\n"
    record = gateway.record(got.headers["x-request-id"])
    assert record["error"] == {"code": "upstream_error", "message": f"an event is over {LIMIT} bytes"}
