"""The real OpenID provider, installed once and started once per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.oidc_peer import OidcProvider, install


@pytest.fixture(scope="session")
def oidc_installed() -> None:
    install()


@pytest.fixture(scope="module")
def oidc_provider(oidc_installed: None) -> Iterator[OidcProvider]:
    provider = OidcProvider()
    yield provider
    provider.stop()
