"""`kill -9` the gateway (a real `idgate serve` process) under load: every call an upstream saw has its decision."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.conftest import UPSTREAM_KEY, base_config
from tests.support import TestIssuer, Upstream, free_port, raw_request

WORKERS = 48


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDGATE_")}
    env.update({"IDGATE_HOME": str(home), "TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    return env


def serve(config: Path, home: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "idgate", "serve", "--config", str(config), "--port", str(port)],
        env=environment(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        with suppress(OSError):
            if raw_request(f"http://127.0.0.1:{port}", "GET", "/readyz", timeout=1).status == 200:
                return process
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("idgate serve did not become ready")
        time.sleep(0.05)


async def load(url: str, token: str, stop: asyncio.Event) -> None:
    """Callers sending chats, each with a trace id of its own in the prompt (the upstream logs it)."""

    async def caller(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            trace, span = os.urandom(16).hex(), os.urandom(8).hex()
            body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": trace}]})
            headers = {"Authorization": f"Bearer {token}", "traceparent": f"00-{trace}-{span}-01"}
            try:
                async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as response:
                    await response.read()
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)  # the gateway is gone

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(caller(session) for _ in range(WORKERS)))


def decided_traces(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as connection:
        rows = connection.execute("SELECT record FROM audit_records WHERE kind = 'decision'").fetchall()
    return {orjson.loads(row[0])["trace_id"] for row in rows}


async def test_kill_9_under_load_loses_no_decision_and_the_chain_verifies(
    issuer: TestIssuer, upstream: Upstream, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    config = base_config(issuer, upstream)
    config["server"] = {"audiences": ["idgate-test"]}
    config["audit"] = {"checkpoint_every": 200}
    config_file = tmp_path / "idgate.yaml"
    config_file.write_bytes(orjson.dumps(config))  # JSON is YAML
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve(config_file, home, port)
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    busy = asyncio.Event()

    def log_request(body: dict[str, Any]) -> None:
        seen.append(body["messages"][0]["content"])
        if len(seen) == 400:
            loop.call_soon_threadsafe(busy.set)

    upstream.on_request = log_request
    stop = asyncio.Event()
    running = asyncio.get_running_loop().create_task(load(url, issuer.mint(), stop))
    try:
        await asyncio.wait_for(busy.wait(), 30)  # the load got going
        os.kill(process.pid, signal.SIGKILL)  # mid-flight: requests are being decided and forwarded
        process.wait(10)
        await asyncio.sleep(0.3)  # let any call already on the wire reach the upstream
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
        if process.poll() is None:
            process.kill()

    await asyncio.to_thread(check_after_crash, seen, home, config_file, port)


def check_after_crash(seen: list[str], home: Path, config_file: Path, port: int) -> None:
    url = f"http://127.0.0.1:{port}"
    path = home / "audit.db"
    journals = path.with_name("audit.db.pending")
    left = [p for p in journals.iterdir() if p.stat().st_size > 0]
    assert left, "the killed gateway left a journal (its records committed but not yet in the trail)"

    again = serve(config_file, home, port)  # a restart moves what the journal holds into the trail
    try:
        assert raw_request(url, "GET", "/readyz").status == 200
        decided = decided_traces(path)
        missing = [trace for trace in seen if trace not in decided]
        assert not missing, f"{len(missing)} of {len(seen)} forwarded calls have no decision record"
        assert not any(p.exists() for p in left), "the left-over journal is gone once moved"
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(20)
    assert list(journals.iterdir()) == []  # a clean stop leaves no journal
    verified = subprocess.run(
        [sys.executable, "-m", "idgate", "audit", "verify", "--config", str(config_file)],
        env=environment(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip().endswith("chain intact")
