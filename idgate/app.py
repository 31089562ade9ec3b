"""`build_app(config)`: the one place where the stages are wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from idgate.audit.chain import checkpoint_signer
from idgate.audit.records import policy_reload_record
from idgate.audit.trail import build_writer, config_loaded_record
from idgate.audit.writer import AuditWriter
from idgate.classify import Classifier
from idgate.config import Config, IssuerConfig, SpiffeIssuerConfig, load_config
from idgate.errors import ConfigError, IdgateError, MethodNotAllowed, NotFound, shown
from idgate.identity.allowed import Allowed, issuer_names
from idgate.identity.authenticator import Authenticator
from idgate.identity.devissuer import DevIssuer, dev_issuer_config
from idgate.identity.dpop import DPoPCheck, build_verifier
from idgate.identity.gate import Gate
from idgate.identity.issuers import OidcIssuer, SpiffeIssuer, TokenIssuer
from idgate.identity.keys import JWKSLoader, KeySet, file_loader, http_loader
from idgate.identity.mtls import SCOPE_KEY as CLIENT_CERTIFICATES
from idgate.identity.mtls import ClientCertificates
from idgate.identity.pseudonym import Pseudonyms
from idgate.identity.replay import build_replay_cache
from idgate.mcp.gateway import mcp_resources
from idgate.mcp.wiring import build_mcp, with_mcp_audiences
from idgate.policy import (
    AudienceSpec,
    CedarAuthorizer,
    DataClasses,
    EntitlementSpec,
    EntityData,
    ModelSpec,
    PolicyStore,
    PolicyWatcher,
    ReloadOutcome,
)
from idgate.policy.authzen import AuthZen
from idgate.policy.demo import POLICY as DEMO_POLICY
from idgate.providers.base import Provider
from idgate.providers.demo import DemoProvider
from idgate.providers.openai import OpenAIProvider
from idgate.proxy.admission import Admission
from idgate.proxy.api import Gateway, Route
from idgate.proxy.http import Receive, Request, Scope, Send, send_error, send_json
from idgate.sts.keys import SigningKeys
from idgate.sts.lifecycle import Lifecycle, build_lifecycle
from idgate.sts.resources import ResourceAudiences
from idgate.sts.service import build_sts

__all__ = ["IdgateApp", "app_from_environment", "build_app"]

log = logging.getLogger("idgate")

Handler = Callable[[Request, Send], Awaitable[None]]

PROTECTED_RESOURCE_PATH = "/.well-known/oauth-protected-resource"


class _SharedSession:
    """One aiohttp session for fetching keys, opened when the loop runs."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession()
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def _keyset(config: IssuerConfig | SpiffeIssuerConfig, fetch: _SharedSession, use: str) -> KeySet:
    loader: JWKSLoader
    if config.jwks_file is not None:
        loader = file_loader(config.jwks_file)
    elif isinstance(config, IssuerConfig) and config.discovery:
        loader = http_loader(fetch, config.issuer, discovery=True)
    elif config.jwks_uri is not None:
        loader = http_loader(fetch, config.jwks_uri, discovery=False)
    else:
        loader = _no_keys
    return KeySet(
        config.name,
        loader,
        use=use,
        refetch_interval=config.refetch_interval_seconds,
        cache_ttl=config.cache_ttl_seconds,
    )


async def _no_keys() -> dict[str, Any]:
    return {"keys": []}


def _issuers(config: Config, fetch: _SharedSession) -> list[TokenIssuer]:
    audiences = config.server.accepted_audiences
    issuers: list[TokenIssuer] = []
    if config.dev_issuer.enabled:
        DevIssuer(config).ensure_key()
        dev = dev_issuer_config(config)
        issuers.append(OidcIssuer(dev, _keyset(dev, fetch, "sig"), audiences, credential_kind="dev"))
    for item in config.issuers:
        secret = config.reveal(item.hmac_secret) if item.hmac_secret is not None else None
        issuers.append(OidcIssuer(item, _keyset(item, fetch, "sig"), audiences, secret))
    for domain in config.spiffe:
        issuers.append(SpiffeIssuer(domain, _keyset(domain, fetch, "jwt-svid"), audiences))
    return issuers


def _providers(config: Config) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for item in config.providers:
        if item.type == "demo":
            field = None if item.identity_field == "none" else item.identity_field
            providers[item.name] = DemoProvider(item.name, field)
        else:
            key = config.reveal(item.api_key) if item.api_key is not None else None
            providers[item.name] = OpenAIProvider(item, key)
    return providers


def _askers(config: Config, issuers: list[TokenIssuer]) -> Allowed:
    """Who may ask the AuthZEN endpoints: `authzen.allowed_*`, each `ISSUER_NAME:VALUE`."""
    try:
        return Allowed(
            config.authzen.allowed_subjects, config.authzen.allowed_groups, issuer_names(issuers), "authzen.allowed"
        )
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


def policy_store(config: Config) -> PolicyStore:
    """Policies and entity data from the config (files), plus the config's models.

    With no `policy.files`, the built-in demo policy applies; with no
    `policy.entities`, every tenant is entitled to every model and function
    tool, still subject to the policy's tenant and data-class rules.
    """
    locations = {p.name: p.location for p in config.providers}
    models = EntityData(
        models=tuple(
            ModelSpec(
                name=m.name,
                provider=m.provider,
                location=locations[m.provider],
                tenant=m.tenant,
                max_data_class=m.max_data_class,
            )
            for m in config.models
        )
    )
    # The gateway's own audiences, so that tokens for it can be exchanged (policy still decides).
    models = models.merge(
        EntityData(audiences=tuple(AudienceSpec(name=a, tenant="*") for a in config.server.accepted_audiences))
    )
    if not config.policy.entities:
        grant = EntitlementSpec(
            tenant="*",
            models=tuple(m.name for m in config.models),
            tools=(f"{config.policy.function_tools_server}/*", *(f"{s.name}/*" for s in config.mcp.servers)),
            audiences=config.server.accepted_audiences,
        )
        models = models.merge(EntityData(entitlements=(grant,)))
    return PolicyStore(
        config.policy.files or (DEMO_POLICY,),
        entities=models,
        entity_files=config.policy.entities,
        classes=DataClasses(config.data_classes.levels),
    )


class IdgateApp:
    """The ASGI application: routes, lifespan, and the last line of error handling."""

    def __init__(self, config: Config) -> None:
        config = with_mcp_audiences(config)  # each MCP server's resource URL is an audience of the gateway
        self.config = config
        self._fetch = _SharedSession()
        self._watcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.providers = _providers(config)
        routes = {m.name: Route(m, self.providers[m.provider]) for m in config.models}
        # One signing key signs the chain's checkpoints and the token service's tokens.
        keys = SigningKeys.open(config.home, config.sts.algorithm)
        self.audit: AuditWriter = build_writer(config, checkpoint_signer(keys))
        # The token service's issuer is one the gateway trusts: its tokens come back as credentials.
        sts = build_sts(config.sts, config.server, config.home, keys) if config.sts.enabled else None
        issuers = _issuers(config, self._fetch) + ([sts.issuer] if sts is not None else [])
        self.authenticator = Authenticator(
            issuers,
            clock_skew=config.server.clock_skew_seconds,
            resource_metadata=f"{config.server.url}{PROTECTED_RESOURCE_PATH}",
        )
        # Identity, then the per-call checks of the credential (binding, liveness): every endpoint asks the gate.
        # Client certificates (idgate/identity/mtls.py): an X.509-SVID is an identity; `cnf.x5t#S256` binds a token.
        self.certificates = ClientCertificates.from_config(config, [i for i in issuers if isinstance(i, SpiffeIssuer)])
        self.gate = Gate(
            self.authenticator,
            resource_metadata=f"{config.server.url}{PROTECTED_RESOURCE_PATH}",
            certificate_identity=self.certificates.caller,
        )
        self.gate.add_check(self.certificates.check_binding)
        # Liveness: revoked tokens, ended tasks and sessions are refused on every call (idgate/sts/revocation.py).
        self.lifecycle = build_lifecycle(
            config,
            gate=self.gate,
            authenticator=self.authenticator,
            issuers=issuers,
            record=self.audit.emit,
            fetch=self._fetch,
        )
        self.gate.add_standing_check(self.lifecycle.liveness)  # also asked again by long streams (MCP)
        # A token for one MCP server (RFC 8707 `resource`) is good under /mcp/ only (idgate/sts/resources.py).
        self.gate.add_check(ResourceAudiences(mcp_resources(config.mcp, config.server.url)))
        # DPoP (RFC 9449): proofs' `jti`s and client assertions' are single-use across every worker.
        self.replay = build_replay_cache(config.sts.replay_cache, config.home, config.reveal)
        self.dpop = build_verifier(config.sts.dpop, config.server.url, config.home, self.replay)
        self.gate.add_check(DPoPCheck(self.dpop))
        self.policies = policy_store(config)
        self.authorizer = CedarAuthorizer(self.policies, max_delegation_depth=config.policy.max_delegation_depth)
        classifier = Classifier(DataClasses(config.data_classes.levels), config.data_classes.detectors or None)
        admission = Admission(
            self.authorizer,
            classifier,
            tenant_classes=config.data_classes.tenants,
            unentitled_tools=config.policy.unentitled_tools,
            function_tools_server=config.policy.function_tools_server,
        )
        self.mcp = build_mcp(
            config,
            gate=self.gate,
            authorizer=self.authorizer,
            admission=admission,
            keys=keys,
            audit=self.audit,
            policies=self.policies,
            store=self.lifecycle.liveness.store,
        )
        self.gateway = Gateway(
            redact=classifier.redact if config.audit.record_content else None,
            gate=self.gate,
            authorizer=self.authorizer,
            admission=admission,
            routes=routes,
            audit=self.audit,
            pseudonyms=Pseudonyms.from_state(config.home),
            max_body_bytes=config.server.max_body_bytes,
            fail_open_reads=config.audit.fail_open_reads,
            new_trace_flags=config.audit.new_trace_flags,
        )
        authzen = AuthZen(
            self.gate,
            self.authorizer,
            base_url=config.server.url,
            askers=_askers(config, issuers),
            max_body_bytes=config.server.max_body_bytes,
        )
        self._routes: dict[str, dict[str, Handler]] = {
            "/access/v1/evaluation": {"POST": authzen.evaluation},
            "/access/v1/evaluations": {"POST": authzen.evaluations},
            "/.well-known/authzen-configuration": {"GET": authzen.metadata},
            "/v1/chat/completions": {"POST": self.gateway.chat_completions},
            "/v1/embeddings": {"POST": self.gateway.embeddings},
            "/v1/models": {"GET": self.gateway.models},
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            PROTECTED_RESOURCE_PATH: {"GET": self._protected_resource},
        }
        if sts is not None:
            self._routes.update(
                sts.routes(
                    self.authenticator,
                    self.authorizer,
                    self.audit.emit,
                    dpop=self.dpop,
                    replay=self.replay,
                    fetch=self._fetch,
                    clock_skew=config.server.clock_skew_seconds,
                    liveness=self.lifecycle.liveness,
                    tasks=self.lifecycle.tasks,
                    metadata=self.lifecycle.metadata(sts.issuer.issuer),
                    commit=self.audit.commit,  # an issued token's record is committed before it is sent
                )
            )
        self._routes.update(self.lifecycle.routes())

    async def startup(self) -> None:
        self.audit.start()
        self._loop = asyncio.get_running_loop()
        self.audit.emit(config_loaded_record(self.config, self.policies.revision))
        if self.config.policy.reload_interval_seconds > 0:
            watcher = PolicyWatcher(
                self.policies, self.config.policy.reload_interval_seconds, on_reload=self._policy_reloaded
            )
            self._watcher = asyncio.get_running_loop().create_task(watcher.run())
        for provider in self.providers.values():
            await provider.start()
        await self.mcp.start()
        await self.lifecycle.liveness.start()

    def _policy_reloaded(self, outcome: ReloadOutcome) -> None:
        """Every reload, taken or refused, goes on record (from the reloading thread, via the loop)."""
        record = policy_reload_record(outcome.revision, outcome.changed, outcome.problems)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._audit_quietly, record)

    def _audit_quietly(self, record: dict[str, Any]) -> None:
        with contextlib.suppress(IdgateError):
            self.audit.emit(record)

    async def shutdown(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for provider in self.providers.values():
            await provider.close()
        await self._fetch.close()
        await self.mcp.close()
        await self.lifecycle.liveness.stop()
        self.lifecycle.liveness.store.close()
        self.audit.close()
        await self.replay.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[CLIENT_CERTIFICATES] = self.certificates  # for `idgate.identity.mtls.peer_certificate(request)`
        request = Request(scope, receive)
        path = request.path
        methods = self._routes.get(path)
        if methods is None and path.startswith("/v1/models/"):
            methods = {"GET": self.gateway.model}
        elif methods is None and path.startswith(Lifecycle.TASK_PREFIX):
            methods = {"GET": self.lifecycle.task_item, "POST": self.lifecycle.task_item}
        elif methods is None and path.startswith(("/mcp/", "/.well-known/oauth-protected-resource/mcp/")):
            methods = self.mcp.methods(path)
        handler = methods.get(request.method) if methods is not None else None
        try:
            if methods is None:
                raise NotFound(f"no endpoint at `{shown(path)}`")
            if handler is None:
                raise MethodNotAllowed(f"`{shown(path)}` accepts {', '.join(methods)}", tuple(methods))
            await handler(request, send)
        except IdgateError as error:
            await send_error(send, error, request.id)
        except Exception:
            # The gateway's own handlers answer their errors; this is the last line.
            log.exception("unexpected error on %s %s (request %s)", request.method, shown(path), request.id)
            with contextlib.suppress(Exception):  # the response may have started already
                await send_error(send, IdgateError("internal error"), request.id)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which stops
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _protected_resource(self, request: Request, send: Send) -> None:
        """RFC 9728: what this resource is and where its tokens come from (named in every 401)."""
        url = self.config.server.url
        servers = ([url] if self.config.sts.enabled else []) + [i.issuer for i in self.config.issuers]
        metadata = {
            "resource": url,
            "authorization_servers": servers,
            "bearer_methods_supported": ["header"],
            "resource_name": "idgate",
            "dpop_signing_alg_values_supported": list(self.dpop.algorithms),
        }
        await send_json(send, 200, metadata, request.id)

    async def _healthz(self, request: Request, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"}, request.id)

    async def _readyz(self, request: Request, send: Send) -> None:
        live = self.lifecycle.liveness.fresh
        ready = self.audit.healthy and live
        checks = {"audit": self.audit.healthy, "liveness": live}
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        await send_json(send, 200 if ready else 503, body, request.id)


def build_app(config: Config) -> IdgateApp:
    return IdgateApp(config)


def app_from_environment() -> IdgateApp:
    """Factory for `uvicorn --factory` and `idgate serve --workers N` (reads `IDGATE_CONFIG`)."""
    return build_app(load_config())
