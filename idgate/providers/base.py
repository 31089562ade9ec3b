"""What a model provider is to the gateway.

A provider gets a request body that the proxy has already rewritten (upstream
model name, pseudonymous user id, never a caller's token) and the W3C
`traceparent` the call carries (the request's trace, the gateway's span; see
`idgate.audit.records.upstream_traceparent`), and returns the upstream's
answer: whole (`complete`) or as raw SSE bytes (`stream`). Failures are idgate
errors (`UpstreamError`, `UpstreamTimeout`) or, for a request the upstream
itself refused as invalid, `UpstreamRejected` with its status and body.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from typing import Any, Literal

__all__ = ["Endpoint", "Provider", "UpstreamRejected"]

Endpoint = Literal["chat/completions", "embeddings"]


class UpstreamRejected(Exception):
    """The upstream refused the request as the caller's fault (4xx); relayed as is.

    `headers` are the few response headers that tell the caller what to do
    next (`retry-after` on a 429), relayed with the body.
    """

    def __init__(self, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.headers = headers


class Provider(ABC):
    name: str
    identity_field: str | None = "user"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connection pools; called once the event loop runs."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Close connection pools."""

    @abstractmethod
    async def complete(self, endpoint: Endpoint, body: dict[str, Any], *, traceparent: str | None = None) -> bytes:
        """The upstream's JSON answer as bytes; `traceparent` goes with the call as its header."""

    @abstractmethod
    def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, traceparent: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The upstream's SSE bytes; errors before the first chunk mean nothing was sent."""
