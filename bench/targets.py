"""The four things measured, each behind the same small interface.

A `Target` prepares itself once (installs, version lookup) and then serves: a
context manager that starts its process pinned to the gateway CPU, waits until
it answers, yields an `Endpoint` to load, and stops it again. A target that
cannot run raises `Unavailable` with the reason, and the run goes on without it.

* ``direct``: the mock upstream itself, no gateway;
* ``floor``: the bare pass-through proxy (floor_proxy.py);
* ``litellm``: LiteLLM's proxy from its own venv, master key, no database;
* ``idgate``: ``idgate serve`` with a config written for the run, and a token
  from its development issuer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import install
import procs

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MODEL = "bench-model"
START_TIMEOUT = {"floor": 30.0, "litellm": 180.0, "idgate": 60.0}


def idgate_config(folder: Path, port: int, upstream: str) -> Path:
    """The benchmarked idgate's config in `folder`: the dev issuer, one model on the mock upstream."""
    config = folder / "idgate.yaml"
    config.write_text(
        f"""server: {{host: 127.0.0.1, port: 0, public_url: "http://127.0.0.1:{port}"}}
state: {{home: {folder / "state"}}}
dev_issuer: {{enabled: true, tenant: bench}}
providers:
  - {{name: mock, type: openai, base_url: "{upstream}/v1", api_key: {{env: BENCH_UPSTREAM_KEY}}}}
models:
  - {{name: {MODEL}, provider: mock}}
"""
    )
    return config


class Unavailable(Exception):
    """The target cannot be measured in this run; the message says why."""


@dataclass(frozen=True)
class Endpoint:
    url: str  # the chat completions URL
    headers: dict[str, str]
    model: str = MODEL
    pids: tuple[int, ...] = ()  # the processes whose CPU is the gateway's


@dataclass
class Context:
    processes: procs.Processes
    work: Path  # scratch folder of this run (configs, state)
    upstream: str  # base URL of the mock upstream, no trailing slash
    gateway_cpu: int | None
    install_log: Path


class Target:
    name: ClassVar[str]

    def __init__(self) -> None:
        self.version = ""  # what was measured, when known

    def prepare(self, ctx: Context) -> None:
        """Install or check what the target needs; raise `Unavailable` if it cannot run."""
        return None

    def serve(self, ctx: Context) -> contextlib.AbstractContextManager[Endpoint]:
        """Start the target; the context yields its endpoint and stops it on exit."""
        raise NotImplementedError


def _json_headers(token: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _start(
    ctx: Context,
    name: str,
    argv: list[str],
    health: str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> procs.Process:
    """Start a gateway pinned to the gateway CPU and wait for GET `health` to answer 200."""
    process = ctx.processes.start(name, argv, cpu=ctx.gateway_cpu, env=env, cwd=cwd)
    try:
        procs.wait_http(process, health, timeout=START_TIMEOUT[name])
    except procs.StartError as exc:
        ctx.processes.stop(process)
        raise Unavailable(f"did not start: {exc}") from None
    return process


class Direct(Target):
    name = "direct"

    @contextlib.contextmanager
    def serve(self, ctx: Context) -> Iterator[Endpoint]:
        yield Endpoint(f"{ctx.upstream}/v1/chat/completions", _json_headers())


class Floor(Target):
    name = "floor"

    @contextlib.contextmanager
    def serve(self, ctx: Context) -> Iterator[Endpoint]:
        port = procs.free_port()
        argv = [sys.executable, str(BENCH_DIR / "floor_proxy.py"), "--port", str(port), "--upstream", ctx.upstream]
        # the floor relays any request, so it is ready once the mock's model list comes through
        process = _start(ctx, self.name, argv, f"http://127.0.0.1:{port}/v1/models")
        try:
            yield Endpoint(f"http://127.0.0.1:{port}/v1/chat/completions", _json_headers(), pids=(process.pid,))
        finally:
            ctx.processes.stop(process)


class LiteLLM(Target):
    name = "litellm"

    def __init__(self, venv: Path = BENCH_DIR / ".venv-litellm") -> None:
        super().__init__()
        self.venv = venv
        self.command = venv / "bin" / "litellm"

    def prepare(self, ctx: Context) -> None:
        try:
            self.command = install.ensure_litellm(self.venv, ctx.install_log)
        except install.InstallError as exc:
            raise Unavailable(f"install failed: {exc}") from None
        self.version = install.package_version(self.venv / "bin" / "python", "litellm")

    def _config(self, folder: Path, upstream: str, master_key: str) -> Path:
        config = folder / "litellm.yaml"
        config.write_text(
            f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream}/v1
      api_key: sk-bench-upstream
general_settings:
  master_key: {master_key}
  disable_spend_logs: true
litellm_settings:
  callbacks: []
  success_callback: []
  failure_callback: []
  set_verbose: false
  json_logs: false
  turn_off_message_logging: true
"""
        )
        return config

    @contextlib.contextmanager
    def serve(self, ctx: Context) -> Iterator[Endpoint]:
        folder = ctx.work / "litellm"
        folder.mkdir(exist_ok=True)
        master_key = "sk-bench-" + secrets.token_hex(16)
        config = self._config(folder, ctx.upstream, master_key)
        port = procs.free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY")}
        env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", NO_COLOR="1")
        argv = [
            str(self.command),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        process = _start(ctx, self.name, argv, f"http://127.0.0.1:{port}/health/liveliness", env=env, cwd=folder)
        try:
            yield Endpoint(
                f"http://127.0.0.1:{port}/v1/chat/completions", _json_headers(master_key), pids=(process.pid,)
            )
        finally:
            ctx.processes.stop(process)


class Idgate(Target):
    name = "idgate"

    def __init__(self, command: Path = REPO / ".venv" / "bin" / "idgate") -> None:
        super().__init__()
        self.command = command

    def prepare(self, ctx: Context) -> None:
        if not self.command.exists():
            raise Unavailable(f"{self.command} does not exist (is the idgate package installed?)")
        try:
            done = subprocess.run([str(self.command), "--help"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"`idgate --help` could not run: {exc}") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise Unavailable(f"`idgate --help` exited {done.returncode}: {' | '.join(tail)}")
        self.version = install.package_version(Path(sys.executable), "idgate")

    def _token(self, config: Path, env: dict[str, str]) -> str:
        argv = [str(self.command), "token", "--config", str(config), "--sub", "bench-user", "--ttl", "3600"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"`idgate token` could not run: {exc}") from None
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        if done.returncode != 0 or not lines or lines[-1].count(".") != 2:
            detail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise Unavailable(f"`idgate token` gave no JWT (exit {done.returncode}): {detail}")
        return lines[-1]

    @contextlib.contextmanager
    def serve(self, ctx: Context) -> Iterator[Endpoint]:
        folder = ctx.work / "idgate"
        (folder / "state").mkdir(parents=True, exist_ok=True)
        port = procs.free_port()
        config = idgate_config(folder, port, ctx.upstream)
        env = dict(os.environ)
        env.update(IDGATE_HOME=str(folder / "state"), BENCH_UPSTREAM_KEY="sk-bench-upstream")
        argv = [str(self.command), "serve", "--config", str(config), "--port", str(port)]
        process = _start(ctx, self.name, argv, f"http://127.0.0.1:{port}/healthz", env=env, cwd=folder)
        try:
            token = self._token(config, env)
            yield Endpoint(f"http://127.0.0.1:{port}/v1/chat/completions", _json_headers(token), pids=(process.pid,))
        finally:
            ctx.processes.stop(process)


NAMES = ("direct", "floor", "litellm", "idgate")  # in the order they are measured and shown


def make(names: tuple[str, ...], litellm_venv: Path, idgate_command: Path) -> list[Target]:
    """The targets called `names`, in measuring order."""
    made: dict[str, Target] = {
        "direct": Direct(),
        "floor": Floor(),
        "litellm": LiteLLM(litellm_venv),
        "idgate": Idgate(idgate_command),
    }
    return [made[name] for name in NAMES if name in names]
