"""Wiring of the token service, in two steps around the `Authenticator`.

The gateway trusts its own tokens like any issuer's, so its issuer must be in
the `Authenticator`; and the token service verifies with that `Authenticator`.
Hence::

    sts = build_sts(config.sts, config.server, config.home)     # keys + the gateway's issuer
    authenticator = Authenticator([*issuers, sts.issuer], ...)
    routes.update(sts.routes(authenticator, authorizer))        # /oauth2/token, jwks, metadata
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from idgate.config import ClaimsConfig, IssuerConfig, ServerConfig
from idgate.identity.authenticator import Authenticator
from idgate.identity.dpop import DPoPVerifier
from idgate.identity.issuers import OidcIssuer
from idgate.identity.keys import KeySet
from idgate.identity.mtls import peer_certificate
from idgate.identity.replay import ReplayCache
from idgate.policy.decision import Authorizer
from idgate.proxy.http import Request
from idgate.sts.clients import ClientAuthenticator, ClientCredentials, client_keysets
from idgate.sts.endpoints import Handler, OAuthEndpoints
from idgate.sts.exchange import TokenExchange
from idgate.sts.keys import ALGORITHMS, SigningKeys
from idgate.sts.revocation import Liveness
from idgate.sts.settings import StsSettings
from idgate.sts.tasks import Tasks
from idgate.sts.tokens import TokenMinter

__all__ = ["GATEWAY_ISSUER_NAME", "Sts", "build_sts", "gateway_issuer"]

GATEWAY_ISSUER_NAME = "idgate"


def certificate_thumbprint(request: Request) -> str | None:
    """The `x5t#S256` of the request's verified client certificate (mTLS), None without one."""
    peer = peer_certificate(request)
    return peer.thumbprint if peer is not None else None


def gateway_issuer(keys: SigningKeys, issuer: str, audiences: tuple[str, ...]) -> OidcIssuer:
    """The gateway as a trusted issuer of its own tokens: its key set is read from `keys`, in process."""
    config = IssuerConfig(
        name=GATEWAY_ISSUER_NAME,
        issuer=issuer,
        # Where the keys are published; this issuer reads them from the key file instead.
        jwks_uri=f"{issuer}/.well-known/jwks.json",
        audiences=audiences,
        algorithms=ALGORITHMS,
        claims=ClaimsConfig(),
        refetch_interval_seconds=1.0,  # another worker's rotation is seen within a second
    )
    keyset = KeySet(GATEWAY_ISSUER_NAME, keys.load_public, refetch_interval=1.0, cache_ttl=60.0)
    # A subject keeps the issuer it was first verified from (its pseudonym upstream, its records).
    return OidcIssuer(config, keyset, audiences, subject_issuer_claim=True)


@dataclass(frozen=True)
class Sts:
    """The token service, built: its keys, its issuer (for the `Authenticator`), and its routes."""

    settings: StsSettings
    keys: SigningKeys
    issuer: OidcIssuer
    default_audience: str
    clock: Callable[[], float] = time.time
    audiences: tuple[str, ...] = ()  # the gateway's accepted audiences (its MCP resources among them)

    def routes(
        self,
        authenticator: Authenticator,
        authorizer: Authorizer,
        record: Callable[[dict[str, Any]], None] | None = None,
        *,
        dpop: DPoPVerifier,
        replay: ReplayCache,
        fetch: Callable[[], aiohttp.ClientSession] | None = None,
        peer_thumbprint: Callable[[Request], str | None] | None = certificate_thumbprint,
        clock_skew: float = 60.0,
        liveness: Liveness | None = None,
        tasks: Tasks | None = None,
        metadata: dict[str, Any] | None = None,
        commit: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> dict[str, dict[str, Handler]]:
        """The OAuth endpoints; `record` takes each exchange's audit record (e.g. `AuditWriter.emit`).

        `dpop` checks token requests' DPoP proofs (the same verifier as the gate's), `replay`
        remembers client assertions' `jti`s, `fetch` gives the session for clients' `jwks_uri`,
        `peer_thumbprint` the client certificate of an mTLS connection (None: no binding to it).
        """
        minter = TokenMinter(self.keys, self.issuer.issuer, self.clock)
        exchange = TokenExchange(
            authenticator,
            authorizer,
            minter,
            default_audience=self.default_audience,
            ttl_seconds=self.settings.token_ttl_seconds,
            clock=self.clock,
            liveness=liveness,  # revoked subject/actor tokens are not exchanged
            tasks=tasks,  # the `task` parameter (idgate.sts.tasks)
            gateway_audiences=self.audiences,
        )
        issuer = self.issuer.issuer
        clients = ClientAuthenticator(
            self.settings.clients,
            client_keysets(self.settings.clients, fetch),
            authenticator,
            replay,
            issuer=issuer,
            token_endpoint=f"{issuer}/oauth2/token",
            max_lifetime=self.settings.client_assertion_max_lifetime_seconds,
            clock_skew=clock_skew,
            clock=self.clock,
            liveness=liveness,  # a revoked client (kill switch) gets no token
        )
        client_credentials = ClientCredentials(
            authorizer,
            minter,
            default_audience=self.default_audience,
            public_url=issuer,
            ttl_seconds=self.settings.token_ttl_seconds,
            clock=self.clock,
            gateway_audiences=self.audiences,
        )
        endpoints = OAuthEndpoints(
            exchange,
            self.keys,
            max_body_bytes=self.settings.max_body_bytes,
            clients=clients,
            client_credentials=client_credentials,
            dpop=dpop,
            record=record,
            peer_thumbprint=peer_thumbprint,
            bind_certificates=self.settings.certificate_bound_tokens,
            metadata=metadata,
            commit=commit,  # an issued token's record is committed before the token is sent
            liveness=liveness,  # nobody revoked or held by the kill switch gets a token, whatever the grant
        )
        return endpoints.routes()


def build_sts(settings: StsSettings, server: ServerConfig, home: Path, keys: SigningKeys | None = None) -> Sts:
    """The token service with the signing keys in `home` (opened, or created, unless `keys` are given)."""
    keys = keys or SigningKeys.open(home, settings.algorithm)
    audiences = server.accepted_audiences
    issuer = gateway_issuer(keys, server.url, audiences)
    return Sts(settings, keys, issuer, settings.default_audience or audiences[0], audiences=audiences)
