"""Shared helpers for the policy tests: callers, stores and policy files built in tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from idgate.identity.principal import Actor, Binding, Caller, Credential, Kind, Principal
from idgate.policy import CedarAuthorizer, EntityData, PolicyStore
from idgate.policy.demo import demo_store

MakeStore = Callable[..., PolicyStore]


def caller(
    id: str = "alice",
    tenant: str | None = "acme",
    *,
    kind: Kind = "human",
    groups: Sequence[str] = (),
    actors: Sequence[str | tuple[str, Kind]] = (),
    task: str | None = None,
    binding: Binding = "none",
) -> Caller:
    """A verified caller, as the identity stage would hand it over."""
    chain = tuple(Actor(a) if isinstance(a, str) else Actor(a[0], a[1]) for a in actors)
    return Caller(
        Principal(kind, id, tenant, "test-issuer", tuple(groups)),
        Credential("jwt", "jti-1", "test-issuer", 0.0, binding, task),
        chain,
    )


@pytest.fixture
def demo_authorizer() -> CedarAuthorizer:
    """The shipped demo policy and entities, with requests checked against the schema."""
    return CedarAuthorizer(demo_store(), validate_requests=True)


@pytest.fixture
def make_store(tmp_path: Path) -> MakeStore:
    """A store over policy text written to tmp_path (one file per text) and entity data."""

    def make(*texts: str, entities: dict[str, Any] | None = None, **kwargs: Any) -> PolicyStore:
        files = []
        for i, text in enumerate(texts):
            path = tmp_path / f"p{i}.cedar"
            path.write_text(text)
            files.append(path)
        return PolicyStore(files, entities=EntityData.model_validate(entities or {}), **kwargs)

    return make
