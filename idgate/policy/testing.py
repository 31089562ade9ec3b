"""Policy as code: YAML cases (caller, action, resource, context → allow or deny).

A test file names the policies and entities it tests (paths relative to it) and
its cases::

    policies: [policy.cedar]
    entities: [entities.yaml]
    data_classes: [public, internal, confidential, restricted]   # optional
    max_delegation_depth: 3                                      # optional
    cases:
      - name: an agent without a task is refused
        caller: {kind: human, id: alice, tenant: acme, groups: [acme-ml],
                 actors: [bot], task: null, binding: dpop}
        action: invoke_model
        resource: {model: acme-chat}          # or {tool: billing/refund}, {audience: billing}
        context: {data_class: internal}
        expect: deny
        reason: delegation                    # optional: the reason must match too

A resource the entities do not declare is described inline:
``{model: ghost, provider: p, location: external, tenant: "*", max_data_class: internal}``.
`run_policy_tests` returns one `Mismatch` per case whose decision differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from idgate.config import read_yaml
from idgate.errors import ConfigError
from idgate.identity.principal import Actor, Caller, Credential, CredentialKind, Principal
from idgate.policy.cedar import CedarAuthorizer
from idgate.policy.data_classes import DEFAULT_DATA_CLASSES, DataClasses
from idgate.policy.decision import REASONS, Decision, Resource
from idgate.policy.store import PolicyStore

__all__ = ["Mismatch", "PolicyTests", "load_policy_tests", "run_policy_tests"]

Kind = Literal["human", "service", "agent"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ActorCase(_Frozen):
    id: str
    kind: Kind = "agent"


class CallerCase(_Frozen):
    kind: Kind = "human"
    id: str
    tenant: str | None = None
    groups: tuple[str, ...] = ()
    actors: tuple[ActorCase, ...] = ()
    task: str | None = None
    binding: Literal["bearer", "none", "dpop", "mtls"] = "bearer"
    credential: CredentialKind = "jwt"

    @field_validator("actors", mode="before")
    @classmethod
    def _actor_names(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [{"id": item} if isinstance(item, str) else item for item in value]
        return value

    def caller(self) -> Caller:
        binding: Literal["none", "dpop", "mtls"] = "none" if self.binding == "bearer" else self.binding
        return Caller(
            Principal(self.kind, self.id, self.tenant, "policy-test", self.groups),
            Credential(self.credential, "policy-test", "policy-test", 0.0, binding, self.task),
            tuple(Actor(a.id, a.kind) for a in self.actors),
        )


class ResourceCase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    model: str | None = None
    tool: str | None = None
    audience: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ResourceCase:
        if sum(v is not None for v in (self.model, self.tool, self.audience)) != 1:
            raise ValueError("give exactly one of `model`, `tool` or `audience`")
        return self

    def resource(self) -> Resource:
        kind, id = next(
            (k, v) for k, v in (("model", self.model), ("tool", self.tool), ("audience", self.audience)) if v
        )
        attributes = dict(self.model_extra or {})
        return Resource(kind, id, attributes=attributes or None)


class Case(_Frozen):
    name: str = ""
    caller: CallerCase
    action: str
    resource: ResourceCase
    context: dict[str, str] = Field(default_factory=dict)
    expect: Literal["allow", "deny"]
    reason: str | None = None

    @field_validator("reason")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None and value not in REASONS:
            raise ValueError(f"`{value}` is not one of {', '.join(REASONS)}")
        return value


class PolicyTestFile(_Frozen):
    policies: tuple[str, ...]
    entities: tuple[str, ...] = ()
    data_classes: tuple[str, ...] = DEFAULT_DATA_CLASSES
    max_delegation_depth: int = Field(3, ge=0)
    cases: tuple[Case, ...]

    @field_validator("policies", "entities", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Mismatch:
    """A case whose decision is not the expected one."""

    def __init__(self, index: int, case: Case, decision: Decision) -> None:
        self.index = index
        self.case = case
        self.decision = decision

    @property
    def name(self) -> str:
        return self.case.name or f"case {self.index + 1}"

    def __str__(self) -> str:
        d = self.decision
        expected = self.case.expect + (f" ({self.case.reason})" if self.case.reason else "")
        got = ("allow" if d.allowed else "deny") + f" ({d.reason})"
        details = [f"policies: {', '.join(d.policies) or 'none'}"]
        if d.denied_for:
            details.append(f"refused for {d.denied_for}")
        details.extend(f"error: {e}" for e in d.errors)
        return f"{self.name}: expected {expected}, got {got}; " + "; ".join(details)

    def __repr__(self) -> str:
        return f"Mismatch({self})"


class PolicyTests:
    """A loaded test file: its cases and the store it names."""

    def __init__(self, path: Path, spec: PolicyTestFile) -> None:
        self.path = path
        self.spec = spec

    @property
    def cases(self) -> tuple[Case, ...]:
        return self.spec.cases

    def store(self) -> PolicyStore:
        """The policies and entities the file names, loaded and validated."""
        base = self.path.parent
        return PolicyStore(
            [base / p for p in self.spec.policies],
            entity_files=[base / e for e in self.spec.entities],
            classes=DataClasses(self.spec.data_classes),
        )

    def run(self, store: PolicyStore | None = None) -> list[Mismatch]:
        """Decide every case (against `store`, default the file's own) and list the mismatches."""
        authorizer = CedarAuthorizer(
            store or self.store(), max_delegation_depth=self.spec.max_delegation_depth, validate_requests=True
        )
        mismatches = []
        for index, case in enumerate(self.spec.cases):
            decision = authorizer.authorize(case.caller.caller(), case.action, case.resource.resource(), case.context)
            expected = case.expect == "allow"
            if decision.allowed != expected or (case.reason is not None and decision.reason != case.reason):
                mismatches.append(Mismatch(index, case, decision))
        return mismatches


def load_policy_tests(path: str | Path) -> PolicyTests:
    """Read and check a test file; `ConfigError` says what is wrong and where."""
    path = Path(path)
    data = read_yaml(path, "test file")
    try:
        spec = PolicyTestFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
            message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
            problems.append(f"`{path}`: {where or '(top level)'}: {message}")
        raise ConfigError(problems) from None
    return PolicyTests(path, spec)


def run_policy_tests(path: str | Path, store: PolicyStore | None = None) -> list[Mismatch]:
    """Run the cases of the YAML file at `path`; one `Mismatch` per case that fails."""
    return load_policy_tests(path).run(store)
