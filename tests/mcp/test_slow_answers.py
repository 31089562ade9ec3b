"""An answer the gateway reads whole (a list answer, to filter it) must come whole within the server's
`timeout.read`: a server that trickles bytes, each within the read timeout, would otherwise hold the call (and a
connection) open as long as it likes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from tests.mcp import test_list_filtering as listing
from tests.mcp.test_list_filtering import MakeListGateway, post
from tests.support import AiohttpServer, TestIssuer

make_list_gateway = listing.make_list_gateway  # its server's `timeout.read` is 1.5 s


class Trickler:
    """A tool server whose list answer comes a byte every 0.2 s: never a gap longer than the read timeout."""

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_post("/mcp", self._handle)
        self.server = AiohttpServer(app)
        self.url = self.server.url + "/mcp"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            for _ in range(100):  # 20 s at most, so a test that fails still ends
                await response.write(b" ")
                await asyncio.sleep(0.2)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response


@pytest.fixture
def trickler() -> Iterator[Trickler]:
    server = Trickler()
    yield server
    server.server.stop()


def test_a_list_answer_trickled_past_the_read_timeout_is_a_504(
    make_list_gateway: MakeListGateway, issuer: TestIssuer, trickler: Trickler
) -> None:
    gateway = make_list_gateway(trickler.url)
    started = time.monotonic()
    response = post(gateway, issuer.mint({"sub": "alice"}), {"jsonrpc": "2.0", "id": 7, "method": "resources/list"})
    assert time.monotonic() - started < 4  # 1.5 s and the call's own time, not the 20 s of trickle
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["data"]["code"] == "upstream_timeout" and "within 1.5 s" in error["message"]
    assert response.json()["id"] == 7
