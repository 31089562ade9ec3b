"""Helpers of the task, revocation and session-end tests: a gateway with admins and a resource server."""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import MakeGateway, base_config
from tests.sts.conftest import ACCESS_TOKEN, ENTITIES, JWT, TOKEN_EXCHANGE
from tests.support import Gateway, RawResponse, TestIssuer, Upstream, raw_request

ADMIN = "root"  # an administrator (config `admin.subjects`)
RESOURCE_SERVER = "rs-billing"  # may introspect (config `introspection.allowed_subjects`)

HUMAN_SCOPE = "chat models:read tools:billing"


def human(issuer: TestIssuer, sub: str = "alice", **claims: Any) -> str:
    """A person's login token from the test issuer."""
    return issuer.mint({"sub": sub, "kind": "human", "scope": HUMAN_SCOPE, **claims})


def agent(issuer: TestIssuer, sub: str = "agent-7", **claims: Any) -> str:
    """An agent's own token from the test issuer."""
    return issuer.mint({"sub": sub, "kind": "agent", **claims})


def claims_of(token: str) -> dict[str, Any]:
    """A JWT's payload, unverified (the gateway verified it; the tests only read it)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


@dataclass
class Client:
    """Plain HTTP against one gateway, as a user's tools would send it."""

    url: str

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        *,
        json: Any = None,
        form: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> RawResponse:
        headers: dict[str, str] = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if json is not None:
            body, content_type = orjson.dumps(json), "application/json"
        elif form is not None:
            body, content_type = urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded"
        if content_type is not None:
            headers["Content-Type"] = content_type
        return raw_request(self.url, method, path, body=body, headers=headers)

    def models(self, token: str) -> int:
        """The status of `GET /v1/models` with this token: 200 while it lives, 401 once it does not."""
        return self.call("GET", "/v1/models", token).status

    def exchange(self, subject: str, actor: str | None = None, **params: str) -> RawResponse:
        form = {"grant_type": TOKEN_EXCHANGE, "subject_token": subject, "subject_token_type": ACCESS_TOKEN}
        if actor is not None:
            form |= {"actor_token": actor, "actor_token_type": JWT}
        return self.call("POST", "/oauth2/token", form={**form, **params})

    def exchanged(self, subject: str, actor: str | None = None, **params: str) -> str:
        reply = self.exchange(subject, actor, **params)
        assert reply.status == 200, reply.body
        token: str = reply.json()["access_token"]
        return token

    def start_task(self, token: str, **body: Any) -> dict[str, Any]:
        reply = self.call("POST", "/tasks", token, json=body)
        assert reply.status == 201, reply.body
        task: dict[str, Any] = reply.json()
        return task


def lifecycle_config(issuer: TestIssuer, upstream: Upstream, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    entities = tmp_path / "entities.yaml"
    entities.write_text(ENTITIES)
    config = base_config(issuer, upstream)
    config["policy"] = {"entities": [str(entities)]}
    # Issuer-qualified: `corp` is the test issuer's name in `base_config`.
    config["admin"] = {"subjects": [f"corp:{ADMIN}"]}
    config["introspection"] = {"allowed_subjects": [f"corp:{RESOURCE_SERVER}"]}
    config.update(extra)
    return config


def start(make_gateway: MakeGateway, config: dict[str, Any]) -> tuple[Gateway, Client]:
    gateway = make_gateway(config)
    return gateway, Client(gateway.url)
