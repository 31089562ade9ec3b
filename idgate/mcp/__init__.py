"""MCP tool mediation: `/mcp/{server}` relays MCP streamable HTTP through identity, policy and audit.

See `gateway.py` for the path of one call.
"""

# `idgate.config` imports `idgate.mcp.settings`, which imports `idgate.config`: load config first.
import idgate.config as _config  # noqa: F401
