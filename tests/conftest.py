from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idgate.config import Config
from tests.support import Gateway, TestIssuer, Upstream, drop_schema, unique_schema

UPSTREAM_KEY = "sk-upstream-secret-not-for-callers"
MakeGateway = Callable[..., Gateway]


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    server = TestIssuer()
    yield server
    server.stop()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


def base_config(issuer: TestIssuer, upstream: Upstream) -> dict[str, Any]:
    """Trust the test issuer (keys over HTTP) and route two models to the test upstream."""
    return {
        "issuers": [
            {"name": "corp", "issuer": issuer.issuer, "discovery": True, "refetch_interval_seconds": 0},
        ],
        "providers": [
            {
                "name": "up",
                "type": "openai",
                "base_url": upstream.url,
                "api_key": {"env": "TEST_UPSTREAM_KEY"},
                "timeout": {"connect": 1, "read": 1.5},
            }
        ],
        "models": [
            {"name": "gpt-test", "provider": "up", "upstream_model": "real-model"},
            {"name": "embed-test", "provider": "up", "kind": "embedding"},
            {"name": "beta-only", "provider": "up", "tenant": "beta"},
        ],
    }


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[MakeGateway]:
    started: list[Gateway] = []

    def make(config: dict[str, Any] | Config, env: dict[str, str] | None = None) -> Gateway:
        gateway = Gateway(config, tmp_path / f"home{len(started)}", {"TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})})
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream) -> Gateway:
    return make_gateway(base_config(issuer, upstream))


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A PostgreSQL schema of its own on the `test` database (tests.support.PG_DSN), dropped afterwards."""
    schema = unique_schema()
    yield schema
    drop_schema(schema)
