"""Configuration: one YAML file, validated once into frozen typed objects.

This is the only module that reads the environment (`IDGATE_HOME`,
`IDGATE_CONFIG`, and the variables that secrets name). Everything else receives
a `Config` and never looks elsewhere.

A bad file is refused with the path of every bad key and what was expected, for
example ``providers[0].api_key: secrets are not allowed inline; use `{env: NAME}`
or `{file: PATH}` ``. `idgate config schema` prints the JSON schema.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from idgate.errors import ConfigError
from idgate.secretref import SecretRef
from idgate.sts.client_settings import JWS_ASYMMETRIC, RSA_EC_ALGORITHMS, algorithms_given
from idgate.sts.lifecycle_settings import (
    AdminSettings,
    BackchannelLogoutSettings,
    IntrospectionSettings,
    LivenessSettings,
    SsfSettings,
    TasksSettings,
    issuer_qualified,
)
from idgate.sts.settings import StsSettings
from idgate.tls import TlsSettings, TrustedProxies, tls_problems

__all__ = [
    "AuditConfig",
    "AuthZenConfig",
    "ClaimsConfig",
    "Config",
    "DataClassesConfig",
    "DevIssuerConfig",
    "IssuerConfig",
    "KindRule",
    "ModelConfig",
    "PolicyConfig",
    "ProviderConfig",
    "SecretRef",
    "ServerConfig",
    "SpiffeIssuerConfig",
    "SpiffeRule",
    "TimeoutConfig",
    "config_schema",
    "default_config",
    "load_config",
    "parse_config",
    "read_yaml",
]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
Algorithm = Literal[
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "HS256",
    "HS384",
    "HS512",
]
Kind = Literal["human", "service", "agent"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _no_inline_secret(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError("secrets are not allowed inline; use `{env: NAME}` or `{file: PATH}`")
    return value


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = Field(
        None, description="the URL callers use to reach the gateway; default http://HOST:PORT"
    )
    audiences: tuple[str, ...] = Field(
        (), description="audiences a token must carry to be accepted; default the public URL"
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    clock_skew_seconds: int = Field(60, ge=0, le=600)
    tls: TlsSettings | None = Field(None, description="serve HTTPS, optionally with client certificates (mTLS)")
    trusted_proxies: TrustedProxies = TrustedProxies()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return (self.public_url or f"{scheme}://{self.host}:{self.port}").rstrip("/")

    @property
    def accepted_audiences(self) -> tuple[str, ...]:
        return self.audiences or (self.url,)


class StateConfig(_Frozen):
    home: Path | None = Field(None, description="state folder; default $IDGATE_HOME or ./.idgate")
    # Tasks and revocations (idgate/store): SQLite in the state folder, or PostgreSQL for replicas.
    backend: Literal["sqlite", "postgres"] = Field("sqlite", description="where tasks and revocations live")
    postgres_dsn: str | SecretRef | None = Field(
        None, description="PostgreSQL DSN (`backend: postgres`); with a password, give it as `{env}` or `{file}`"
    )
    postgres_schema: str = Field("idgate", pattern=r"^[a-z_][a-z0-9_]{0,62}$", description="schema of the tables")

    @model_validator(mode="after")
    def _dsn(self) -> StateConfig:
        if self.backend == "postgres" and self.postgres_dsn is None:
            raise ValueError("`backend: postgres` needs `postgres_dsn`")
        if isinstance(self.postgres_dsn, str) and re.search(r"password\s*=|://[^/@:]*:[^/@]*@", self.postgres_dsn):
            raise ValueError("`postgres_dsn` holds a password: give it as `{env: NAME}` or `{file: PATH}`")
        return self


class DevIssuerConfig(_Frozen):
    """The development issuer: a local key in the state folder, for trying idgate out."""

    enabled: bool = False
    tenant: str = "demo"
    max_ttl_seconds: int = Field(24 * 3600, gt=0)


class KindRule(_Frozen):
    """Gives `kind` to principals whose `claim` is present (or equals `equals`)."""

    claim: str
    equals: str | None = None
    kind: Kind


class ClaimsConfig(_Frozen):
    """How an issuer's claims become a principal."""

    subject: str = "sub"
    tenant: str | None = Field("tenant", description="claim holding the tenant")
    default_tenant: str | None = Field(None, description="tenant when the claim is absent")
    groups: str | None = "groups"
    kind: str | None = Field("kind", description="claim holding human|service|agent")
    kind_rules: tuple[KindRule, ...] = ()
    default_kind: Kind = "human"


class _IssuerBase(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    jwks_uri: str | None = None
    jwks_file: Path | None = None
    audiences: tuple[str, ...] = Field((), description="default: the server's audiences")
    algorithms: tuple[Algorithm, ...] = JWS_ASYMMETRIC  # type: ignore[assignment]
    refetch_interval_seconds: float = Field(
        30.0, ge=0, description="an unknown `kid` refetches the keys at most this often"
    )
    cache_ttl_seconds: float = Field(300.0, gt=0, description="keys are refetched after this")

    _algorithms_given = field_validator("algorithms")(algorithms_given)


class IssuerConfig(_IssuerBase):
    """A trusted OIDC/JWT issuer."""

    issuer: str
    discovery: bool = Field(False, description="find `jwks_uri` in ISSUER/.well-known/openid-configuration")
    hmac_secret: Annotated[SecretRef | None, Field(None)] = None
    claims: ClaimsConfig = ClaimsConfig()

    _check_secret = field_validator("hmac_secret", mode="before")(_no_inline_secret)

    @model_validator(mode="after")
    def _key_source(self) -> IssuerConfig:
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        if hmac and self.hmac_secret is None:
            raise ValueError(f"algorithms {hmac} need `hmac_secret`")
        if not hmac and self.hmac_secret is not None:
            raise ValueError("`hmac_secret` is set but no HMAC algorithm is allowed")
        sources = sum(x for x in (self.discovery, self.jwks_uri is not None, self.jwks_file is not None))
        if sources > 1:
            raise ValueError("give only one of `discovery`, `jwks_uri` or `jwks_file`")
        asymmetric = [a for a in self.algorithms if a not in HMAC_ALGORITHMS]
        if asymmetric and sources == 0:
            raise ValueError(
                f"algorithms {asymmetric} need a key source: give one of `discovery: true`, `jwks_uri` or `jwks_file`"
            )
        return self


class SpiffeRule(_Frozen):
    """SPIFFE IDs whose path starts with `path_prefix` are of `kind` (and `tenant`)."""

    path_prefix: str = Field(pattern=r"^/")
    kind: Kind
    tenant: str | None = None


class SpiffeIssuerConfig(_IssuerBase):
    """A SPIFFE trust domain whose JWT-SVIDs are accepted."""

    trust_domain: str = Field(pattern=r"^[a-z0-9._-]+$")
    tenant: str | None = Field(None, description="tenant of its workloads unless a rule says")
    rules: tuple[SpiffeRule, ...] = ()
    default_kind: Kind = "service"
    x509_bundle_file: Path | None = Field(
        None, description="the domain's X.509 authorities (PEM, or a SPIFFE bundle): its X.509-SVIDs are accepted"
    )
    algorithms: tuple[Algorithm, ...] = RSA_EC_ALGORITHMS  # type: ignore[assignment]

    @model_validator(mode="after")
    def _bundle(self) -> SpiffeIssuerConfig:
        if self.jwks_uri is not None and self.jwks_file is not None:
            raise ValueError("give only one of `jwks_uri` or `jwks_file` (the trust bundle)")
        if self.jwks_uri is None and self.jwks_file is None and self.x509_bundle_file is None:
            raise ValueError("give one of `jwks_uri` or `jwks_file` (the trust bundle), or `x509_bundle_file`")
        if any(a in HMAC_ALGORITHMS or a == "EdDSA" for a in self.algorithms):
            raise ValueError("JWT-SVIDs are signed with RS, PS or ES algorithms only")
        return self


class TimeoutConfig(_Frozen):
    connect: float = Field(5.0, gt=0)
    read: float = Field(120.0, gt=0, description="longest wait for the next bytes from upstream")


class ProviderConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["openai", "demo"]
    base_url: str | None = Field(None, description="e.g. https://api.openai.com/v1")
    api_key: Annotated[SecretRef | None, Field(None)] = None
    timeout: TimeoutConfig = TimeoutConfig()
    max_connections: int = Field(100, gt=0)
    identity_field: Literal["user", "safety_identifier", "none"] = Field(
        "user", description="request field that carries the caller's pseudonymous id"
    )
    location: Literal["internal", "external"] = "external"

    _check_secret = field_validator("api_key", mode="before")(_no_inline_secret)

    @model_validator(mode="after")
    def _needs_url(self) -> ProviderConfig:
        if self.type == "openai" and not self.base_url:
            raise ValueError("an `openai` provider needs `base_url`")
        return self


class ModelConfig(_Frozen):
    name: str
    provider: str
    upstream_model: str | None = Field(None, description="name at the provider; default `name`")
    kind: Literal["chat", "embedding"] = "chat"
    tenant: str = Field("*", description="tenant that owns it; `*` for shared")
    max_data_class: str = Field("internal", description="highest data class it may receive")

    @property
    def target(self) -> str:
        return self.upstream_model or self.name


DEFAULT_DATA_CLASSES = ("public", "internal", "confidential", "restricted")


class DataClassesConfig(_Frozen):
    levels: tuple[str, ...] = Field(DEFAULT_DATA_CLASSES, description="data classes, lowest first")
    tenants: dict[str, str] = Field(default_factory=dict, description="the least class of each tenant's requests")
    detectors: dict[str, str] = Field(
        default_factory=dict, description="class a detector's finding implies, over the built-in mapping"
    )

    @model_validator(mode="after")
    def _known(self) -> DataClassesConfig:
        if len(set(self.levels)) != len(self.levels) or not self.levels:
            raise ValueError("`levels` must be distinct names, at least one")
        for tenant, name in (*self.tenants.items(), *self.detectors.items()):
            if name not in self.levels:
                raise ValueError(f"tenants.{tenant}: data class `{name}` is not one of {list(self.levels)}")
        return self


class PolicyConfig(_Frozen):
    files: tuple[Path, ...] = Field((), description="Cedar policy files; default the built-in demo policy")
    entities: tuple[Path, ...] = Field(
        (), description="entity data files (groups, roles, members, tools, entitlements)"
    )
    max_delegation_depth: int = Field(3, ge=0, le=8)
    reload_interval_seconds: float = Field(1.0, ge=0, description="how often files are checked; 0 turns it off")
    unentitled_tools: Literal["remove", "refuse"] = Field(
        "remove", description="a chat request's tools the caller may not use: removed, or the request refused"
    )
    function_tools_server: str = Field(
        "functions", pattern=r"^[A-Za-z0-9_.-]+$", description="server name of a chat request's function tools"
    )


class AuthZenConfig(_Frozen):
    """Who may ask for decisions at the AuthZEN endpoints."""

    allowed_subjects: tuple[str, ...] = Field((), description="subjects that may ask, each `ISSUER_NAME:SUBJECT`")
    allowed_groups: tuple[str, ...] = Field((), description="members of these groups may ask, each `ISSUER_NAME:GROUP`")

    _qualified = field_validator("allowed_subjects", "allowed_groups")(issuer_qualified)


# After `SecretRef`: the audit settings use it (see idgate/audit/settings.py).
from idgate.audit.settings import AuditSettings as AuditConfig  # noqa: E402
from idgate.mcp.settings import McpSettings  # noqa: E402  (after `SecretRef` too: see idgate/mcp/settings.py)


class Config(_Frozen):
    server: ServerConfig = ServerConfig()
    state: StateConfig = StateConfig()
    dev_issuer: DevIssuerConfig = DevIssuerConfig()
    issuers: tuple[IssuerConfig, ...] = ()
    spiffe: tuple[SpiffeIssuerConfig, ...] = ()
    providers: tuple[ProviderConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    audit: AuditConfig = AuditConfig()
    policy: PolicyConfig = PolicyConfig()
    authzen: AuthZenConfig = AuthZenConfig()
    sts: StsSettings = StsSettings()
    data_classes: DataClassesConfig = DataClassesConfig()
    mcp: McpSettings = McpSettings()
    liveness: LivenessSettings = LivenessSettings()
    tasks: TasksSettings = TasksSettings()
    admin: AdminSettings = AdminSettings()
    introspection: IntrospectionSettings = IntrospectionSettings()
    backchannel_logout: BackchannelLogoutSettings = BackchannelLogoutSettings()
    ssf: SsfSettings = SsfSettings()
    # Filled in by load_config from the environment; not part of the file.
    home: Path = Field(Path(".idgate"), exclude=True)
    _env: Mapping[str, str] = PrivateAttr(default_factory=dict)

    def reveal(self, secret: SecretRef) -> str:
        """The value of a secret, from the environment the config was loaded with."""
        return secret.reveal(self._env)

    @model_validator(mode="after")
    def _references(self) -> Config:
        # Model -> provider references are checked on the raw data (see _reference_problems),
        # so that they are reported together with field errors.
        for field, items in (("providers", self.providers), ("models", self.models)):
            names = [item.name for item in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{field}: duplicate names {dupes}")
        for i, model in enumerate(self.models):
            if model.max_data_class not in self.data_classes.levels:
                raise ValueError(
                    f"models[{i}].max_data_class: `{model.max_data_class}` is not one of "
                    f"{list(self.data_classes.levels)}"
                )
        issuer_names = [i.name for i in (*self.issuers, *self.spiffe)]
        if len(set(issuer_names)) != len(issuer_names):
            raise ValueError("issuers/spiffe: names must be unique")
        if {"idgate", "dev"} & set(issuer_names):
            raise ValueError("issuers/spiffe: the names `idgate` and `dev` are the gateway's own issuers")
        if not self.dev_issuer.enabled and not self.issuers and not self.spiffe:
            raise ValueError("no way to authenticate: configure `issuers`, `spiffe` or `dev_issuer`")
        for problem in tls_problems(self):
            raise ValueError(problem)
        return self

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.home / "audit.db"


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "tagged-union")):
            continue
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "literal_error" and "expected" in item.get("ctx", {}):
            message = f"expected one of {item['ctx']['expected']}"
        if not item["loc"] and re.match(r"^[\w\[\]./]+: ", message):
            problems.append(message)  # a whole-config check that names its own key
        else:
            problems.append(f"{_location(tuple(item['loc']))}: {message}")
    return problems


def _reference_problems(data: dict[str, Any]) -> list[str]:
    """Every model naming a provider that is not defined, by its key path."""
    providers = data.get("providers")
    models = data.get("models")
    if not isinstance(models, list):
        return []
    names = {p.get("name") for p in providers if isinstance(p, dict)} if isinstance(providers, list) else set()
    known = ", ".join(f"`{n}`" for n in sorted(n for n in names if isinstance(n, str))) or "none"
    return [
        f"models[{i}].provider: provider `{model['provider']}` is not defined; defined providers: {known}"
        for i, model in enumerate(models)
        if isinstance(model, dict) and isinstance(model.get("provider"), str) and model["provider"] not in names
    ]


def _home(env: Mapping[str, str], configured: Path | None) -> Path:
    return (configured or Path(env.get("IDGATE_HOME") or ".idgate")).expanduser().resolve()


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate already-loaded YAML data; raise `ConfigError` listing every problem."""
    env = os.environ if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of settings"])
    references = _reference_problems(data)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc) + references) from None
    if references:
        raise ConfigError(references)
    config = config.model_copy(update={"home": _home(env, config.state.home)})
    config._env = env
    return config


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in `path`; a `ConfigError` names the file, and the line and problem of bad YAML."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{what} `{path}` cannot be read: {exc.strerror}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        raise ConfigError([f"`{path}` is not valid YAML{where}" + (f": {problem}" if problem else "")]) from None


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load FILE, or `$IDGATE_CONFIG`, or the embedded default when neither is given."""
    env = os.environ if env is None else env
    path = path or env.get("IDGATE_CONFIG") or None
    if path is None:
        return default_config(env)
    config = parse_config(read_yaml(Path(path), "config file"), env)
    base = Path(path).resolve().parent
    policy = config.policy.model_copy(
        update={
            "files": tuple(base / f for f in config.policy.files),
            "entities": tuple(base / f for f in config.policy.entities),
        }
    )
    resolved = config.model_copy(update={"policy": policy})
    resolved._env = config._env
    return resolved


DEFAULT_CONFIG: dict[str, Any] = {
    "dev_issuer": {"enabled": True, "tenant": "demo"},
    "authzen": {"allowed_groups": ["dev:authzen"]},
    "providers": [{"name": "demo", "type": "demo", "location": "internal"}],
    "models": [
        {"name": "demo-chat", "provider": "demo", "max_data_class": "confidential"},
        {"name": "demo-chat-mini", "provider": "demo", "max_data_class": "internal"},
        {"name": "demo-embed", "provider": "demo", "kind": "embedding", "max_data_class": "confidential"},
    ],
}


def default_config(env: Mapping[str, str] | None = None) -> Config:
    """The embedded development profile: works offline on a fresh machine."""
    return parse_config(DEFAULT_CONFIG, env)


def with_listen(config: Config, host: str | None, port: int | None) -> Config:
    """The same config listening elsewhere (command-line flags win over the file)."""
    server = config.server.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    return config.model_copy(update={"server": server})


def config_schema() -> dict[str, Any]:
    """The JSON schema of the configuration file."""
    schema = Config.model_json_schema()
    schema["properties"].pop("home", None)
    schema["title"] = "idgate configuration"
    return schema
