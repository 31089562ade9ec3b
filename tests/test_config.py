"""Loading and validating the config: every bad key named by its path, and the published schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from idgate.config import Config, SecretRef, config_schema, default_config, load_config, parse_config
from idgate.errors import ConfigError

SCHEMA_FILE = Path(__file__).parent.parent / "docs" / "config.schema.json"
ENV = {"IDGATE_HOME": "/tmp/idgate-test-home"}


def good() -> dict[str, Any]:
    return {
        "issuers": [{"name": "corp", "issuer": "https://id.example", "discovery": True}],
        "providers": [
            {"name": "up", "type": "openai", "base_url": "http://127.0.0.1:1/v1", "api_key": {"env": "UP_KEY"}}
        ],
        "models": [{"name": "gpt", "provider": "up"}, {"name": "emb", "provider": "up", "kind": "embedding"}],
    }


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        parse_config(data, ENV)
    assert refused.value.problems, "a ConfigError names at least one problem"
    return refused.value.problems


def test_a_good_config_is_frozen_and_typed() -> None:
    config = parse_config(good(), {**ENV, "UP_KEY": "sk-up"})
    assert isinstance(config, Config)
    assert config.home == Path(ENV["IDGATE_HOME"])
    assert config.models[0].target == "gpt" and config.models[1].kind == "embedding"
    assert config.providers[0].api_key == SecretRef(env="UP_KEY")
    assert config.reveal(SecretRef(env="UP_KEY")) == "sk-up"
    with pytest.raises(ValueError, match="frozen"):
        config.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.update(bogus=1), "bogus: unknown key"),
        (lambda c: c.update(server={"prot": 80}), "server.prot: unknown key"),
        (
            lambda c: c["providers"][0].update(timeout={"read": 1, "write": 2}),
            "providers[0].timeout.write: unknown key",
        ),
        (lambda c: c.update(server={"port": "eighty"}), "server.port: Input should be a valid integer"),
        (lambda c: c.update(server={"port": 70000}), "server.port: Input should be less than or equal to 65535"),
        (lambda c: c.update(server={"max_body_bytes": 0}), "server.max_body_bytes: Input should be greater than 0"),
        (lambda c: c["models"][1].update(kind="image"), "models[1].kind: expected one of 'chat' or 'embedding'"),
        (lambda c: c["providers"][0].update(type="azure"), "providers[0].type: expected one of 'openai' or 'demo'"),
        (
            lambda c: c["providers"][0].update(api_key="sk-inline"),
            "providers[0].api_key: secrets are not allowed inline; use `{env: NAME}` or `{file: PATH}`",
        ),
        (
            lambda c: c["providers"][0].update(api_key={"env": "A", "file": "/k"}),
            "providers[0].api_key: give exactly one of `env` or `file`",
        ),
        (lambda c: c["providers"][0].pop("base_url"), "providers[0]: an `openai` provider needs `base_url`"),
        (lambda c: c["providers"][0].update(name="has space"), "providers[0].name: String should match pattern"),
        (lambda c: c["models"][0].pop("provider"), "models[0].provider: Field required"),
        (
            lambda c: c["issuers"][0].update(hmac_secret="hunter2", algorithms=["HS256"]),
            "issuers[0].hmac_secret: secrets are not allowed inline",
        ),
        (
            lambda c: c["issuers"][0].update(algorithms=["HS256"]),
            "issuers[0]: algorithms ['HS256'] need `hmac_secret`",
        ),
        (
            lambda c: c["issuers"][0].update(jwks_uri="https://id.example/jwks"),
            "issuers[0]: give only one of `discovery`, `jwks_uri` or `jwks_file`",
        ),
        (lambda c: c["issuers"][0].update(algorithms=["none"]), "issuers[0].algorithms[0]: expected one of"),
        (lambda c: c["models"][0].update(provider="nope"), "models[0].provider: provider `nope` is not defined"),
        (lambda c: c["models"][1].update(name="gpt"), "models: duplicate names ['gpt']"),
        (lambda c: c.update(issuers=[]), "no way to authenticate: configure `issuers`, `spiffe` or `dev_issuer`"),
    ],
)
def test_each_problem_names_its_key(change: Any, expected: str) -> None:
    data = good()
    change(data)
    found = problems(data)
    assert any(expected in problem for problem in found), found
    assert not any("sk-inline" in p or "hunter2" in p for p in found)  # a misplaced secret is not echoed


def test_every_field_problem_is_listed_at_once() -> None:
    data = good()
    data["server"] = {"port": "eighty", "bogus": True}
    data["providers"][0]["api_key"] = "sk-inline"
    data["models"][1]["kind"] = "image"
    found = problems(data)
    assert [p.split(":")[0] for p in found] == ["server.port", "server.bogus", "providers[0].api_key", "models[1].kind"]


def test_a_bad_reference_is_listed_with_the_field_problems() -> None:
    data = good()
    data["server"] = {"port": "eighty"}
    data["models"][0]["provider"] = "nope"
    found = problems(data)
    assert any(p.startswith("models[0].provider: ") for p in found), found


def test_every_bad_reference_is_listed_by_its_path() -> None:
    data = good()
    data["models"][0]["provider"] = "nope"
    data["models"][1]["provider"] = "nope2"
    assert [p.split(": ")[0] for p in problems(data)] == ["models[0].provider", "models[1].provider"]


@pytest.mark.parametrize("data", [[1, 2], "server", 42])
def test_a_file_that_is_not_a_mapping(data: Any) -> None:
    assert problems(data) == ["(top level): expected a mapping of settings"]


def test_an_empty_file_is_an_empty_config() -> None:
    assert any("no way to authenticate" in p for p in problems(None))


def test_a_missing_secret_is_named_when_it_is_read() -> None:
    config = parse_config(good(), ENV)
    with pytest.raises(ConfigError, match="environment variable `UP_KEY` is not set"):
        config.reveal(SecretRef(env="UP_KEY"))
    with pytest.raises(ConfigError, match="cannot be read"):
        config.reveal(SecretRef(file=Path("/nonexistent/key")))


# -- load_config -----------------------------------------------------------------------------------


def test_load_a_file(tmp_path: Path) -> None:
    path = tmp_path / "idgate.yaml"
    path.write_bytes(orjson.dumps(good()))  # JSON is YAML
    config = load_config(path, ENV)
    assert [m.name for m in config.models] == ["gpt", "emb"]
    assert load_config(None, {**ENV, "IDGATE_CONFIG": str(path)}).model_dump() == config.model_dump()


def test_load_a_file_that_says_where_its_state_is(tmp_path: Path) -> None:
    path = tmp_path / "idgate.yaml"
    path.write_bytes(orjson.dumps({**good(), "state": {"home": str(tmp_path / "elsewhere")}}))
    assert load_config(path, ENV).home == tmp_path / "elsewhere"
    assert load_config(path, ENV).audit_path == tmp_path / "elsewhere" / "audit.db"


def test_no_file_is_the_embedded_default(tmp_path: Path) -> None:
    config = load_config(None, {"IDGATE_HOME": str(tmp_path)})
    assert config.model_dump() == default_config({"IDGATE_HOME": str(tmp_path)}).model_dump()
    assert config.dev_issuer.enabled and config.home == tmp_path
    assert [m.name for m in config.models] == ["demo-chat", "demo-chat-mini", "demo-embed"]
    assert {p.type for p in config.providers} == {"demo"}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("server:\n  port: 8080\n\thost: x\n", 3),  # a tab cannot indent
        ("server:\n  port: 8080\nmodels: [\n  {name: a,\n", 5),  # never closed
        ("server: {port: 1\nmodels: []\n", 2),
        ("a: b\n  c: d\n", 2),
    ],
)
def test_invalid_yaml_names_the_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path, ENV)
    assert len(refused.value.problems) == 1
    assert refused.value.problems[0].startswith(f"`{path}` is not valid YAML at line {line}, column ")


def test_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read: No such file or directory"):
        load_config(tmp_path / "missing.yaml", ENV)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path, ENV)  # a folder


def test_a_bad_file_names_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: 8080\n  bogus: 1\nproviders:\n  - {name: up, type: openai, api_key: sk-x}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, ENV)
    found = refused.value.problems
    assert any(p.startswith("server.bogus: unknown key") for p in found)
    assert any(p.startswith("providers[0].api_key: secrets are not allowed inline") for p in found)


# -- the published schema --------------------------------------------------------------------------


def test_the_published_schema_is_the_current_one() -> None:
    """`docs/config.schema.json` is what `idgate config schema` prints; regenerate it when this fails."""
    published = SCHEMA_FILE.read_text()
    assert orjson.loads(published) == config_schema(), (
        "docs/config.schema.json is stale: run `idgate config schema > docs/config.schema.json`"
    )
    assert published == orjson.dumps(config_schema(), option=orjson.OPT_INDENT_2).decode() + "\n"


def test_the_schema_describes_the_file() -> None:
    schema = config_schema()
    assert schema["title"] == "idgate configuration" and schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(Config.model_fields) - {"home"}
    defs = schema["$defs"]
    assert all(d.get("additionalProperties") is False for d in defs.values() if d.get("type") == "object")
    provider = defs["ProviderConfig"]["properties"]
    assert provider["type"]["enum"] == ["openai", "demo"]
    assert {"$ref": "#/$defs/SecretRef"} in provider["api_key"]["anyOf"]
