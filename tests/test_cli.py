"""`idgate ...` as a user runs it: a subprocess, the state folder in tmp, every wait bounded."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import openai
import orjson
import pytest
import yaml
from joserfc import jwt
from joserfc.jwk import KeySet

from idgate.audit.records import stories
from idgate.audit.writer import read_records
from idgate.config import config_schema
from tests.support import free_port, raw_request, wait_for

IDGATE = [sys.executable, "-m", "idgate"]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "state"


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_")}
    env["IDGATE_HOME"] = str(home)
    return env


def idgate(home: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IDGATE, *args], env=environment(home), capture_output=True, text=True, timeout=timeout, check=False
    )


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, decoded without verifying (the test verifies separately)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- idgate token ----------------------------------------------------------------------------------


def test_token_carries_the_requested_claims_and_delegation_chain(home: Path) -> None:
    done = idgate(home, "token", "--sub", "bob", "--kind", "agent", "--tenant", "t1", "--act", "a1", "--act", "a2")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token

    claims = claims_of(token)
    assert claims["sub"] == "bob" and claims["kind"] == "agent" and claims["tenant"] == "t1"
    assert claims["act"] == {"sub": "a1", "act": {"sub": "a2"}}  # outermost (current) actor first
    assert claims["iss"] == "urn:idgate:dev" and claims["aud"] == "idgate"
    assert claims["exp"] - claims["iat"] == 3600 and abs(claims["iat"] - time.time()) < 30
    assert claims["jti"]

    # Signed by the key generated into the state folder, whose public half is published there.
    keys = KeySet.import_key_set(orjson.loads((home / "dev-issuer.jwks.json").read_bytes()))
    assert jwt.decode(token, keys).claims["sub"] == "bob"
    assert (home / "dev-issuer.key.json").stat().st_mode & 0o077 == 0  # the private key is the owner's only


def test_token_ttl_groups_and_defaults(home: Path) -> None:
    done = idgate(home, "token", "--sub", "bob", "--kind", "agent", "--tenant", "t1", "--ttl", "60")
    assert done.returncode == 0, done.stderr
    claims = claims_of(done.stdout.strip())
    assert claims["exp"] - claims["iat"] == 60 and "act" not in claims

    done = idgate(home, "token", "--group", "eng", "--group", "ops")
    claims = claims_of(done.stdout.strip())
    assert claims["sub"] == "dev-user" and claims["kind"] == "human" and claims["tenant"] == "demo"
    assert claims["groups"] == ["eng", "ops"]


@pytest.mark.parametrize("ttl", ["0", "-5", str(24 * 3600 + 1)])
def test_token_refuses_a_ttl_out_of_range(home: Path, ttl: str) -> None:
    done = idgate(home, "token", "--ttl", ttl)
    assert done.returncode != 0 and done.stdout == ""
    assert f"ttl `{ttl}` must be between 1 and 86400 seconds" in done.stderr


def test_token_refuses_an_unknown_kind(home: Path) -> None:
    done = idgate(home, "token", "--kind", "robot")
    assert done.returncode != 0 and done.stdout == ""
    assert "invalid choice: 'robot'" in done.stderr


def test_token_refuses_when_the_dev_issuer_is_off(home: Path, tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "prod.yaml",
        {
            "dev_issuer": {"enabled": False},
            "issuers": [{"name": "corp", "issuer": "https://id.example", "jwks_file": str(tmp_path / "jwks.json")}],
        },
    )
    done = idgate(home, "token", "--config", str(config))
    assert done.returncode != 0 and done.stdout == ""
    assert "dev_issuer.enabled: the development issuer is off in this config" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (home / "dev-issuer.key.json").exists()


# -- idgate config ---------------------------------------------------------------------------------


GOOD: dict[str, Any] = {
    "server": {"port": 9000},
    "issuers": [{"name": "corp", "issuer": "https://id.example", "discovery": True}],
    "providers": [{"name": "up", "type": "openai", "base_url": "http://127.0.0.1:1/v1", "api_key": {"env": "K"}}],
    "models": [{"name": "gpt", "provider": "up"}],
}


def test_config_check_accepts_a_good_file(home: Path, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "good.yaml", GOOD)
    done = idgate(home, "config", "check", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{path}: ok (policy revision pol_")
    assert not home.exists()  # checking writes nothing


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c["server"].update(bogus=1), ["server.bogus: unknown key"]),
        (lambda c: c.update(extra_section={}), ["extra_section: unknown key"]),
        (lambda c: c["server"].update(port="eighty"), ["server.port: Input should be a valid integer"]),
        (lambda c: c["providers"][0].update(type="azure"), ["providers[0].type: expected one of 'openai' or 'demo'"]),
        (
            lambda c: c["providers"][0].update(api_key="sk-live-123"),
            ["providers[0].api_key: secrets are not allowed inline; use `{env: NAME}` or `{file: PATH}`"],
        ),
        (
            lambda c: c["models"][0].update(provider="missing"),
            ["models[0].provider: provider `missing` is not defined; defined providers: `up`"],
        ),
    ],
)
def test_config_check_says_what_is_wrong_and_where(
    home: Path, tmp_path: Path, change: Any, expected: list[str]
) -> None:
    data = orjson.loads(orjson.dumps(GOOD))
    change(data)
    path = write_yaml(tmp_path / "bad.yaml", data)
    done = idgate(home, "config", "check", str(path))
    assert done.returncode != 0 and done.stdout == ""
    for problem in expected:
        assert problem in done.stderr
    assert str(path) in done.stderr and "Traceback" not in done.stderr
    assert "sk-live-123" not in done.stderr  # the offending secret is not repeated


def test_config_check_lists_every_problem_at_once(home: Path, tmp_path: Path) -> None:
    data = orjson.loads(orjson.dumps(GOOD))
    data["server"]["bogus"] = 1
    data["server"]["port"] = "eighty"
    data["providers"][0]["api_key"] = "sk-live-123"
    data["models"].append({"name": "other", "provider": "up", "kind": "image"})
    done = idgate(home, "config", "check", str(write_yaml(tmp_path / "bad.yaml", data)))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4, done.stderr
    for where in ("server.bogus", "server.port", "providers[0].api_key", "models[1].kind"):
        assert any(f": {where}: " in line for line in lines), where


def test_config_check_of_broken_yaml_names_the_line(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  port: 8080\nmodels: [\n  {name: a\n")
    done = idgate(home, "config", "check", str(path))
    assert done.returncode != 0
    assert "is not valid YAML at line" in done.stderr


def test_config_check_of_a_missing_file(home: Path, tmp_path: Path) -> None:
    done = idgate(home, "config", "check", str(tmp_path / "nope.yaml"))
    assert done.returncode != 0 and "cannot be read" in done.stderr


def test_config_schema_prints_the_json_schema(home: Path) -> None:
    done = idgate(home, "config", "schema")
    assert done.returncode == 0, done.stderr
    schema = orjson.loads(done.stdout)
    assert schema == config_schema()
    assert schema["title"] == "idgate configuration" and schema["additionalProperties"] is False
    assert {"server", "providers", "models", "dev_issuer", "issuers", "audit"} <= set(schema["properties"])
    assert "home" not in schema["properties"]


# -- idgate serve ----------------------------------------------------------------------------------


class Served:
    """`idgate serve ...` in its own process group, its output collected by a thread."""

    def __init__(self, home: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [*IDGATE, "serve", "--port", str(self.port), *args],
            env=environment(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def ready(self) -> bool:
        assert self.process.poll() is None, self.output
        try:
            return raw_request(self.url, "GET", "/healthz", timeout=1).status == 200
        except OSError:
            return False

    def children(self) -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids

    def stop(self, timeout: float = 15) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def serve(home: Path) -> Iterator[Any]:
    started: list[Served] = []

    def start(*args: str) -> Served:
        served = Served(home, *args)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_the_embedded_default(serve: Any, home: Path, tmp_path: Path) -> None:
    served: Served = serve()
    wait_for(served.ready, timeout=20)
    out = served.output
    assert f"idgate: serving on {served.url}" in out
    assert f"idgate: state in {home}" in out
    assert "development issuer is ON" in out and "demo-chat" in out
    assert "idgate token" in out and f"OPENAI_BASE_URL={served.url}/v1" in out

    # The printed recipe works as printed, pasted into a shell in some other folder.
    recipe = out.split("  try it:\n", 1)[1].split("\n\n", 1)[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shell_env = {k: v for k, v in os.environ.items() if not k.startswith(("IDGATE_", "OPENAI_"))}
    tried = subprocess.run(
        ["bash", "-ec", recipe], cwd=elsewhere, env=shell_env, capture_output=True, text=True, timeout=30, check=False
    )
    assert tried.returncode == 0, tried.stderr
    assert orjson.loads(tried.stdout)["choices"][0]["message"]["content"] == "demo reply to: hi"

    token = idgate(home, "token", "--sub", "carol").stdout.strip()
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key=token, max_retries=0, timeout=10) as client:
        reply = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "demo reply to: hi"
        with pytest.raises(openai.AuthenticationError):
            client.with_options(api_key="nope").models.list()

    # uvicorn shuts down gracefully, then re-raises the signal: the exit status says "ended by SIGTERM".
    assert served.stop() in (0, -signal.SIGTERM)
    assert "Finished server process" in served.output and "Traceback" not in served.output
    records = stories(read_records(home / "audit.db"))  # flushed on the way out; one view per request
    assert [r["status"] for r in records] == [200, 200, 401]
    assert [r["subject"] and r["subject"]["id"] for r in records] == ["alice", "carol", None]


def test_serve_with_two_workers(serve: Any, home: Path) -> None:
    served: Served = serve("--workers", "2")
    wait_for(served.ready, timeout=30)
    wait_for(lambda: len(served.children()) >= 2, timeout=10)
    workers = served.children()

    token = idgate(home, "token", "--sub", "dave").stdout.strip()
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key=token, max_retries=0, timeout=10) as client:
        for i in range(12):
            reply = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": f"n{i}"}])
            assert reply.choices[0].message.content == f"demo reply to: n{i}"
        with client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "a stream"}], stream=True
        ) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "demo reply to: a stream"
    for _ in range(8):  # new connections, spread over the workers
        assert raw_request(served.url, "GET", "/healthz").status == 200

    assert served.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in served.output
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=10)  # orphans reaped by now
    records = stories(read_records(home / "audit.db"))  # both workers wrote to the one trail
    assert len(records) == 13 and {r["subject"]["id"] for r in records} == {"dave"}
    assert (home / "effective-config.yaml").exists()


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--port", "70000", "`70000` is out of range; expected 0 to 65535"),
        ("--port", "http", "`http` is not a whole number"),
        ("--workers", "0", "`0` is out of range; expected 1 to 1024"),
    ],
)
def test_serve_refuses_bad_flags(home: Path, flag: str, value: str, says: str) -> None:
    done = idgate(home, "serve", flag, value, timeout=10)  # a bad flag must not start serving
    assert done.returncode == 2 and done.stdout == ""
    assert f"argument {flag}: {says}" in done.stderr


def test_serve_refuses_a_bad_config(home: Path, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "bad.yaml", {"server": {"port": "x"}})
    done = subprocess.run(
        [*IDGATE, "serve", "--config", str(path)],
        env=environment(home),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "server.port" in done.stderr and "Traceback" not in done.stderr
