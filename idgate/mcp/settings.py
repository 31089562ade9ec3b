"""Settings of the MCP gateway, hung under `Config.mcp`.

Imports `SecretRef` from `idgate.config`, which imports this module after
defining it; `idgate.mcp` imports `idgate.config` first, so either import order works.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from idgate.config import SecretRef

__all__ = ["McpBudgets", "McpServerConfig", "McpSettings", "McpTimeouts", "StaticCredential"]

_NAME = r"^[A-Za-z0-9_.-]+$"
_CLASS = r"^[A-Za-z0-9_.-]+$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StaticCredential(_Frozen):
    """A fixed bearer token the tool server accepts: only `read` tools are callable through it."""

    static: SecretRef = Field(description="`{env: NAME}` or `{file: PATH}`: sent as `Authorization: Bearer ...`")


class McpTimeouts(_Frozen):
    connect: float = Field(2.0, gt=0, le=60, description="seconds to connect to the tool server")
    read: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="seconds to wait for its answer (a POST's first byte); not for GET or `subscriptions/listen`"
        " streams",
    )


class McpServerConfig(_Frozen):
    """One upstream MCP server, served at `/mcp/NAME`."""

    name: str = Field(pattern=_NAME, description="served at `/mcp/NAME`; tools are `NAME/TOOL` to the policy")
    url: str = Field(description="the server's streamable HTTP endpoint, e.g. http://127.0.0.1:9000/mcp")
    auth: Literal["minted", "none"] | StaticCredential = Field(
        "minted",
        description='"minted": a token per call, signed by the gateway; {static: SECRET}: a fixed token; "none"',
    )
    audience: str | None = Field(None, description="`aud` of the minted tokens; default the server's `url`")
    tools: dict[str, str] = Field(
        default_factory=dict,
        description='action class of each tool: "read", "write" or a privileged action name (e.g. "refund")',
    )
    unknown_tool_class: str = Field(
        "privileged",
        pattern=_CLASS,
        description="action class of a tool `tools` does not name (the strictest: never read)",
    )
    timeout: McpTimeouts = McpTimeouts()

    @model_validator(mode="after")
    def _classes(self) -> McpServerConfig:
        for tool, action in self.tools.items():
            if not tool or "/" in tool or any(c.isspace() for c in tool):
                raise ValueError(f"tools: `{tool}` is not a tool name (no spaces or `/`)")
            if not action or not all(c.isalnum() or c in "_.-" for c in action):
                raise ValueError(f"tools.{tool}: `{action}` is not an action class")
        if self.unknown_tool_class == "read":
            raise ValueError("unknown_tool_class: an unknown tool is never a read")
        return self

    @property
    def token_audience(self) -> str:
        return self.audience or self.url


class McpBudgets(_Frozen):
    """Limits on tool calls, so that a runaway agent is stopped; unset: no limit."""

    task_calls: int | None = Field(None, gt=0, description="tool calls per task (the credential's `task`)")
    task_writes: int | None = Field(None, gt=0, description="non-read tool calls per task")
    agent_calls: int | None = Field(None, gt=0, description="tool calls per acting agent per window")
    agent_writes: int | None = Field(None, gt=0, description="non-read tool calls per acting agent per window")
    agent_window_seconds: int = Field(3600, gt=0, description="the per-agent window")


class McpSettings(_Frozen):
    """The MCP gateway: `/mcp/NAME` relays MCP streamable HTTP to each configured server."""

    servers: tuple[McpServerConfig, ...] = ()
    token_ttl_seconds: int = Field(60, gt=0, le=600, description="lifetime of a per-call token minted for a server")
    budgets: McpBudgets = McpBudgets()
    max_response_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="largest answer read whole to check it (a POST's JSON answer, a list answer, a GET's or"
        " DELETE's JSON answer), or one event of an event stream; larger is an error for the request (raise it"
        " for tools or resources that answer with more, e.g. large blobs)",
    )

    @model_validator(mode="after")
    def _unique(self) -> McpSettings:
        names = [s.name for s in self.servers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"servers: duplicate names {dupes}")
        return self
