"""A gateway with the token service (on by default), for the tests of `idgate.sts`."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from idgate.sts.service import Sts, build_sts
from tests.conftest import MakeGateway, base_config
from tests.support import Gateway, TestIssuer, Upstream

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"

ENTITIES = """
audiences:
  - {name: "https://billing.example", tenant: "*"}
  - {name: ledger, tenant: beta}
entitlements:
  - tenant: "*"
    models: [gpt-test, embed-test]
    audiences: [idgate-test, "https://billing.example", ledger]
"""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes


@dataclass
class StsGateway:
    gateway: Gateway
    sts: Sts

    @property
    def url(self) -> str:
        return self.gateway.url

    def post(
        self,
        form: dict[str, str | list[str]] | None = None,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        data = body if body is not None else urllib.parse.urlencode(form or {}, doseq=True).encode()
        request = urllib.request.Request(
            f"{self.url}/oauth2/token",
            data=data,
            method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
        )
        return _open(request)

    def get(self, path: str) -> Reply:
        return _open(urllib.request.Request(f"{self.url}{path}"))

    def exchange(self, subject: str, actor: str | None = None, **params: str | list[str]) -> Reply:
        form: dict[str, str | list[str]] = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": ACCESS_TOKEN,
        }
        if actor is not None:
            form |= {"actor_token": actor, "actor_token_type": JWT}
        return self.post({**form, **params})


def _open(request: urllib.request.Request) -> Reply:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, orjson.loads(raw), raw)
    except urllib.error.HTTPError as error:
        raw = error.read()
        return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, orjson.loads(raw), raw)


@pytest.fixture
def sts_gateway(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> Iterator[StsGateway]:
    entities = tmp_path / "entities.yaml"
    entities.write_text(ENTITIES)
    config = base_config(issuer, upstream)
    config["policy"] = {"entities": [str(entities)]}
    gateway = make_gateway(config)
    # A second handle on the same keys in the state folder, for the tests to look at.
    yield StsGateway(gateway, build_sts(gateway.config.sts, gateway.config.server, gateway.config.home))
