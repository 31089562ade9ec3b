"""Across workers: a task completed on one gateway process is refused by another within the bound.

Two `idgate serve` processes share one state folder (`IDGATE_HOME`): the SQLite
state store, the signing keys, the development issuer. Each keeps its own
in-memory view of the revocation log; the second learns of the completion by
polling the store (`liveness.poll_interval_seconds`), and must refuse the
task's token within one second (DESIGN.md, invariant 7).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import MakeGateway
from tests.sts.lifecycle_support import ADMIN, Client, claims_of, lifecycle_config, start
from tests.support import PG_DSN, TestIssuer, Upstream, free_port, raw_request, wait_for

PUBLIC_URL = "http://idgate.test"  # both processes are one gateway to their callers


class ServeProcess:
    """`idgate serve --config FILE --port P` in its own process group; stopped by the fixture."""

    def __init__(self, home: Path, config: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_")}
        env["IDGATE_HOME"] = str(home)
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "idgate", "serve", "--config", str(config), "--port", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.log = log

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return raw_request(self.url, "GET", "/readyz", timeout=1).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._log.close()


@pytest.fixture
def two_gateways(tmp_path: Path) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    home = tmp_path / "state"
    config = tmp_path / "idgate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"public_url": PUBLIC_URL},
                "dev_issuer": {"enabled": True, "tenant": "demo"},
                "providers": [{"name": "demo", "type": "demo", "location": "internal"}],
                "models": [{"name": "demo-chat", "provider": "demo"}],
                "liveness": {"poll_interval_seconds": 0.05, "max_staleness_seconds": 1.0},
            }
        )
    )
    # The state folder (keys) is made once, as `idgate serve` does, before both processes start.
    assert dev_token(home, config).count(".") == 2
    first = ServeProcess(home, config, tmp_path / "first.log")
    second = ServeProcess(home, config, tmp_path / "second.log")
    try:
        wait_for(first.ready, timeout=30)
        wait_for(second.ready, timeout=30)
        yield first, second
    finally:
        first.stop()
        second.stop()


def dev_token(home: Path, config: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_")}
    env["IDGATE_HOME"] = str(home)
    done = subprocess.run(
        [sys.executable, "-m", "idgate", "token", "--config", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def test_a_completed_task_is_refused_on_another_worker_within_one_second(
    two_gateways: tuple[ServeProcess, ServeProcess], tmp_path: Path
) -> None:
    first, second = (Client(g.url) for g in two_gateways)
    alice = dev_token(tmp_path / "state", tmp_path / "idgate.yaml", "--sub", "alice", "--ttl", "600")
    latencies = []
    for round_ in range(3):
        task = first.start_task(alice, purpose=f"round {round_}", lifetime_seconds=300)
        bound = first.exchanged(alice, task=task["id"])
        assert claims_of(bound)["task"] == task["id"] and claims_of(bound)["iss"] == PUBLIC_URL
        assert first.models(bound) == 200 and second.models(bound) == 200  # both workers accept it

        completed = first.call("POST", f"/tasks/{task['id']}/complete", alice)
        done_at = time.monotonic()
        assert completed.status == 200
        assert first.models(bound) == 401  # the worker that completed it: at once
        for _ in range(400):  # bounded: well past one second of polling
            if second.models(bound) == 401:
                break
            time.sleep(0.005)
        latencies.append(time.monotonic() - done_at)
        assert second.models(bound) == 401
        assert second.call("GET", f"/tasks/{task['id']}", alice).json()["status"] == "completed"
    assert max(latencies) < 1.0, latencies


def test_a_revocation_on_one_worker_is_refused_on_another(
    two_gateways: tuple[ServeProcess, ServeProcess], tmp_path: Path
) -> None:
    first, second = (Client(g.url) for g in two_gateways)
    token = first.exchanged(dev_token(tmp_path / "state", tmp_path / "idgate.yaml", "--sub", "bob"))
    assert second.models(token) == 200
    assert first.call("POST", "/oauth2/revoke", form={"token": token}).status == 200
    started = time.monotonic()
    wait_for(lambda: second.models(token) == 401, timeout=2)
    assert time.monotonic() - started < 1.0


def test_replicas_sharing_postgresql_see_each_others_revocations(
    make_gateway: MakeGateway, issuer: TestIssuer, upstream: Upstream, tmp_path: Path, pg_schema: str
) -> None:
    """Two gateways (as on two machines: separate state folders) share the state in PostgreSQL."""
    state = {"backend": "postgres", "postgres_dsn": PG_DSN, "postgres_schema": pg_schema}
    config = lifecycle_config(issuer, upstream, tmp_path, state=state)
    _, first = start(make_gateway, config)
    _, second = start(make_gateway, config)
    alice = issuer.mint({"sub": "alice", "kind": "human"})
    admin = issuer.mint({"sub": ADMIN, "kind": "human"})
    task = first.start_task(alice, purpose="shared")
    assert second.call("GET", f"/tasks/{task['id']}", alice).json()["status"] == "active"
    assert first.models(alice) == 200 and second.models(alice) == 200

    revoked = first.call("POST", "/admin/revoke", admin, json={"subject": "alice", "reason": "offboarded"})
    assert revoked.status == 200
    started = time.monotonic()
    wait_for(lambda: second.models(alice) == 401, timeout=2)
    assert time.monotonic() - started < 1.0
    assert second.call("POST", f"/tasks/{task['id']}/complete", admin).json()["status"] == "completed"
