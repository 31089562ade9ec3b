"""Entity data: who belongs to what, which resources exist, who is entitled to them.

Written as plain data (a Python structure or YAML), validated once into frozen
typed objects, then compiled into an `EntityGraph` (see `graph.py`)::

    groups:       [{name: acme-ml, groups: [acme-all], roles: [], tenant: acme}]
    roles:        [{name: billing-agent, roles: []}]
    members:      [{principal: "Agent::billing-bot", tenant: acme, roles: [billing-agent]}]
    models:       [{name: gpt-4o, provider: openai, location: external, tenant: "*", max_data_class: internal}]
    tools:        [{server: billing, name: refund, action: refund, tenant: acme}]
    audiences:    [{name: ledger-api, tenant: acme}]
    entitlements: [{group: acme-ml, models: [gpt-4o], tools: ["billing/*"]}]

An entitlement's holder is exactly one of `group`, `role`, `tenant` (`"*"`: every
principal) or `principal` (`"Human::alice"`). A group with a `tenant` counts as a
token's group only for principals of that tenant, so a token from one tenant
cannot claim another tenant's group; declared `members` always count.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from idgate.config import read_yaml
from idgate.errors import ConfigError

__all__ = [
    "PRINCIPAL_TYPES",
    "AudienceSpec",
    "EntitlementSpec",
    "EntityData",
    "GroupSpec",
    "MemberSpec",
    "ModelSpec",
    "RoleSpec",
    "ToolSpec",
    "load_entity_data",
    "parse_entity_data",
    "parse_principal",
]

PRINCIPAL_TYPES = {"human": "Human", "service": "Service", "agent": "Agent"}
_PRINCIPAL = re.compile(r'^(Human|Service|Agent)::(?:"([^"]+)"|([^"\s]+))$')
_NAME = r"^[^\s/]+$"


def parse_principal(text: str) -> tuple[str, str]:
    """`Human::alice` or `Human::"alice"` → `("Human", "alice")`."""
    match = _PRINCIPAL.match(text)
    if match is None:
        raise ValueError(f"principal `{text}` is not `Human::ID`, `Service::ID` or `Agent::ID`")
    return match.group(1), match.group(2) or match.group(3)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GroupSpec(_Frozen):
    name: str = Field(pattern=_NAME)
    groups: tuple[str, ...] = Field((), description="groups this group is part of")
    roles: tuple[str, ...] = Field((), description="roles this group holds")
    tenant: str | None = Field(None, description="a token's group claim counts only for this tenant")


class RoleSpec(_Frozen):
    name: str = Field(pattern=_NAME)
    roles: tuple[str, ...] = Field((), description="roles this role is part of")


class MemberSpec(_Frozen):
    principal: str = Field(description="`Human::alice`, `Service::ID` or `Agent::ID`")
    tenant: str | None = Field(None, description="an agent's tenant (a token's tenant wins for a subject)")
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _principal(self) -> MemberSpec:
        parse_principal(self.principal)
        return self


class ModelSpec(_Frozen):
    name: str
    provider: str
    location: Literal["internal", "external"]
    tenant: str = Field("*", description='tenant that owns it; "*" for shared')
    max_data_class: str = Field(description="highest data class it may receive, by name")


class ToolSpec(_Frozen):
    server: str = Field(pattern=_NAME)
    name: str = Field(pattern=_NAME)
    action: str = Field("read", pattern=r"^[A-Za-z0-9_.-]+$", description='"read", "write" or a privileged action')
    tenant: str = "*"

    @property
    def id(self) -> str:
        return f"{self.server}/{self.name}"


class AudienceSpec(_Frozen):
    name: str
    tenant: str = "*"


class EntitlementSpec(_Frozen):
    group: str | None = None
    role: str | None = None
    tenant: str | None = None
    principal: str | None = None
    models: tuple[str, ...] = ()
    tools: tuple[str, ...] = Field((), description="tool ids `server/name`, or `server/*` for every tool of a server")
    audiences: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_holder(self) -> EntitlementSpec:
        holders = [h for h in (self.group, self.role, self.tenant, self.principal) if h is not None]
        if len(holders) != 1:
            raise ValueError("give exactly one of `group`, `role`, `tenant` or `principal`")
        if self.principal is not None:
            parse_principal(self.principal)
        return self


class EntityData(_Frozen):
    """Entity data, whole or a part; `merge` combines parts (files, the config's models).

    A part may grant resources another part declares; `check_references` (run
    by the store on the merged whole) says which grants name nothing.
    """

    groups: tuple[GroupSpec, ...] = ()
    roles: tuple[RoleSpec, ...] = ()
    members: tuple[MemberSpec, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    audiences: tuple[AudienceSpec, ...] = ()
    entitlements: tuple[EntitlementSpec, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> EntityData:
        for field, names in (
            ("groups", [g.name for g in self.groups]),
            ("roles", [r.name for r in self.roles]),
            ("members", [parse_principal(m.principal) for m in self.members]),
            ("models", [m.name for m in self.models]),
            ("tools", [t.id for t in self.tools]),
            ("audiences", [a.name for a in self.audiences]),
        ):
            seen: set[object] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"{field}: `{_show(name)}` is declared twice")
                seen.add(name)
        return self

    def check_references(self) -> None:
        """`ConfigError` for each grant of a model, tool or audience that is not declared."""
        problems = []
        models = {m.name for m in self.models}
        tools = {t.id for t in self.tools}
        audiences = {a.name for a in self.audiences}
        for i, grant in enumerate(self.entitlements):
            for j, model in enumerate(grant.models):
                if model not in models:
                    problems.append(f"entitlements[{i}].models[{j}]: model `{model}` is not declared")
            for j, tool in enumerate(grant.tools):
                # `server/*` may grant tools discovered at run time, so it needs no declaration
                if tool not in tools and not re.fullmatch(r"[^\s/]+/\*", tool):
                    problems.append(f"entitlements[{i}].tools[{j}]: tool `{tool}` is not declared")
            for j, audience in enumerate(grant.audiences):
                if audience not in audiences:
                    problems.append(f"entitlements[{i}].audiences[{j}]: audience `{audience}` is not declared")
        if problems:
            raise ConfigError([f"entity data: {p}" for p in problems])

    def merge(self, *others: EntityData) -> EntityData:
        """This data plus `others`; a name declared in two parts is an error."""
        combined: dict[str, list[Any]] = {name: list(getattr(self, name)) for name in EntityData.model_fields}
        for other in others:
            for name in EntityData.model_fields:
                combined[name].extend(getattr(other, name))
        return parse_entity_data(combined)


def _show(name: object) -> str:
    return "::".join(name) if isinstance(name, tuple) else str(name)


def _location(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"


def parse_entity_data(data: Any, source: str = "entity data") -> EntityData:
    """Validate already-loaded data; `ConfigError` names each bad key."""
    try:
        return EntityData.model_validate(data or {})
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
            where = f"{_location(tuple(item['loc']))}: " if item["loc"] else ""
            problems.append(f"{source}: {where}{message}")
        raise ConfigError(problems) from None


def load_entity_data(path: Path) -> EntityData:
    """Read a YAML (or JSON) entity file."""
    return parse_entity_data(read_yaml(path, "entity file"), f"`{path}`")
