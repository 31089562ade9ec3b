"""`idgate revoke`: the kill switch from a shell, against a running gateway sharing the state store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from idgate.cli import main
from tests.conftest import MakeGateway
from tests.sts.lifecycle_support import Client, agent, human, lifecycle_config, start
from tests.support import Gateway, TestIssuer, Upstream, wait_for


@pytest.fixture
def served(make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path) -> tuple[Gateway, Client]:
    return start(make_gateway, lifecycle_config(issuer, upstream, tmp_path))


def config_file(gateway: Gateway, tmp_path: Path, issuer: TestIssuer, upstream: Upstream) -> Path:
    """A config for the command: the gateway's, with its state folder (where the state store and trail are)."""
    config: dict[str, Any] = lifecycle_config(issuer, upstream, tmp_path)
    config["state"] = {"home": str(gateway.config.home)}
    path = tmp_path / "idgate.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    return path


def revocations(gateway: Gateway) -> list[dict[str, Any]]:
    return [r for r in gateway.raw_records() if r["kind"] == "action" and r["action"] == "revocation"]


def test_an_operator_holds_and_lifts_an_agent_from_the_shell(
    served: tuple[Gateway, Client],
    issuer: TestIssuer,
    upstream: Upstream,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, client = served
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "unused-by-the-command")
    alice = human(issuer)
    delegated = client.exchanged(alice, agent(issuer, "agent-7"))
    innocent = client.exchanged(alice, agent(issuer, "agent-9"))
    assert client.models(delegated) == 200
    config = config_file(gateway, tmp_path, issuer, upstream)

    assert main(["revoke", "--config", str(config), "--agent", "agent-7", "--reason", "runaway refunds"]) == 0
    assert "held agent `agent-7`" in capsys.readouterr().out
    wait_for(lambda: client.models(delegated) == 401, timeout=5)  # the gateway's next poll of the store
    assert client.models(innocent) == 200
    assert client.exchange(alice, agent(issuer, "agent-7")).status == 400  # and no new token for it

    assert main(["revoke", "--config", str(config), "--agent", "agent-7", "--reason", "fixed", "--lift"]) == 0
    wait_for(lambda: client.exchange(alice, agent(issuer, "agent-7")).status == 200, timeout=5)

    held, lifted = revocations(gateway)[-2:]
    assert held["target"] == "agent-7" and held["outcome"] == "held" and held["details"]["via"] == "cli"
    assert held["details"]["reason"] == "runaway refunds" and held["details"]["by"].startswith("cli:")
    assert lifted["outcome"] == "lifted" and lifted["details"]["lift"] is True


def test_a_subject_of_one_issuer_only(
    served: tuple[Gateway, Client],
    issuer: TestIssuer,
    upstream: Upstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, client = served
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "unused-by-the-command")
    config = config_file(gateway, tmp_path, issuer, upstream)
    alice = human(issuer)
    argv = ["revoke", "--config", str(config), "--subject", "alice", "--reason", "left"]
    assert main([*argv, "--issuer", "https://other.example"]) == 0
    assert client.models(alice) == 200  # another issuer's alice
    assert main([*argv, "--issuer", issuer.issuer]) == 0
    wait_for(lambda: client.models(alice) == 401, timeout=5)


def test_bad_invocations_say_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["revoke", "--agent", "a", "--issuer", "https://x", "--reason", "r"]) == 2
    assert "--issuer narrows a --subject only" in capsys.readouterr().err
    assert main(["revoke", "--agent", "a", "--reason", "  "]) == 2
    with pytest.raises(SystemExit):
        main(["revoke", "--agent", "a", "--tenant", "t", "--reason", "r"])  # exactly one target
