"""Building the MCP gateway from the config: what `idgate.app` calls, in two steps.

`with_mcp_audiences(config)` first: each MCP server's resource URL
(`{gateway}/mcp/{name}`) becomes an accepted audience, so that the issuers,
the token service and the policy's audiences all know it (an MCP client asks
for a token with that `resource`, RFC 8707). Then `build_mcp(...)`.
"""

from __future__ import annotations

from collections.abc import Callable

from idgate.audit.writer import AuditWriter
from idgate.config import Config
from idgate.identity.gate import Gate
from idgate.mcp.gateway import McpGateway, mcp_resources
from idgate.mcp.pins import PinStore
from idgate.mcp.sessions import SessionIds
from idgate.policy.decision import Authorizer
from idgate.policy.store import PolicyStore
from idgate.proxy.admission import Admission
from idgate.store.base import StateStore
from idgate.sts.keys import SigningKeys
from idgate.sts.tokens import TokenMinter

__all__ = ["build_mcp", "declared_tool_class", "with_mcp_audiences"]


def with_mcp_audiences(config: Config) -> Config:
    """`config` with every MCP server's resource URL among the server's accepted audiences."""
    extra = [r for r in mcp_resources(config.mcp, config.server.url) if r not in config.server.accepted_audiences]
    if not extra:
        return config
    server = config.server.model_copy(update={"audiences": (*config.server.accepted_audiences, *extra)})
    return config.model_copy(update={"server": server})


def declared_tool_class(store: PolicyStore) -> Callable[[str], str | None]:
    """A tool's action class as the policy's entity data declares it (None: not declared)."""

    def lookup(tool: str) -> str | None:
        facts = store.snapshot.graph.resource("tool", tool)
        return None if facts is None else facts.context.get("tool_action")

    return lookup


def build_mcp(
    config: Config,
    *,
    gate: Gate,
    authorizer: Authorizer,
    admission: Admission,
    keys: SigningKeys,
    audit: AuditWriter,
    policies: PolicyStore,
    store: StateStore,
) -> McpGateway:
    """`store`: the state store the budgets count in (shared by every worker)."""
    url = config.server.url
    servers = ([url] if config.sts.enabled else []) + [i.issuer for i in config.issuers]
    return McpGateway(
        config.mcp,
        base_url=url,
        gate=gate,
        authorizer=authorizer,
        admission=admission,
        minter=TokenMinter(keys, url),
        audit=audit,
        pins=PinStore(config.home),
        store=store,
        sessions=SessionIds.from_state(config.home),
        authorization_servers=servers,
        reveal=config.reveal,
        declared_class=declared_tool_class(policies),
        policy_version=lambda: policies.snapshot,
        max_body_bytes=config.server.max_body_bytes,
        new_trace_flags=config.audit.new_trace_flags,
    )
