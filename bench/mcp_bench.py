"""`tools/call` through idgate against calling the MCP server directly, with the official `mcp` SDK client.

    .venv/bin/python bench/mcp_bench.py                 # 2,000 sequential calls per side, then 10 s at c16
    .venv/bin/python bench/mcp_bench.py --calls 500 --duration 3

A tool server built with the `mcp` SDK (one `read` tool, `echo`) runs in its own
process; idgate (`idgate serve`, dev issuer, SQLite audit trail, the tool server
under `mcp.servers` with minted per-call tokens) in another. With two or more
CPUs, idgate is pinned to CPU 0 and the tool server and the client to the
others (`taskset`). The client is one `mcp.Client` per side (protocol
2026-07-28, one POST per call).

- latency: sequential calls (c1), direct and through idgate interleaved in
  blocks of 100 so that drift hits both; p50/p99 of each and the difference
  (the gateway's added latency; target: p50 under 2 ms);
- throughput: calls/s with `--concurrency` calls in flight for `--duration` s.

Results: a table on stdout and bench/results/mcp.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    return argv if cpus is None else ["taskset", "-c", cpus, *argv]


def serve_tool(port: int) -> None:
    """The tool server process: the SDK's MCPServer under uvicorn."""
    import uvicorn
    from mcp.server.mcpserver import MCPServer
    from mcp.server.transport_security import TransportSecuritySettings

    server = MCPServer("bench")

    @server.tool(description="Echo the text back.")
    async def echo(text: str) -> str:
        return text

    app = server.streamable_http_app(
        json_response=True, transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False)
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (and its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    urls: dict[str, str], token: str, calls: int, concurrency: int, duration: float, gateway_pid: int
) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {name: [] for name in urls}
    throughput: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, Client] = {}
        for name, url in urls.items():
            headers = {"Authorization": f"Bearer {token}"} if name == "idgate" else {}
            http = await stack.enter_async_context(httpx2.AsyncClient(headers=headers, timeout=30))
            transport = streamable_http_client(url, http_client=http)
            clients[name] = await stack.enter_async_context(Client(transport, cache=None))
        for client in clients.values():  # warm up: connections, caches, JIT-free paths
            for _ in range(50):
                await client.call_tool("echo", {"text": "warm"})
        block = 100
        done = 0
        gateway_cpu = 0.0
        while done < calls:
            for name, client in clients.items():
                cpu_before = cpu_seconds(gateway_pid)
                for _ in range(min(block, calls - done)):
                    started = time.perf_counter()
                    await client.call_tool("echo", {"text": "hello"})
                    latencies[name].append((time.perf_counter() - started) * 1000)
                if name == "idgate":
                    gateway_cpu += cpu_seconds(gateway_pid) - cpu_before
            done += block
        for name, client in clients.items():
            count = 0
            stop = time.monotonic() + duration

            async def worker(c: Client = client, stop: float = stop) -> None:
                nonlocal count
                while time.monotonic() < stop:
                    await c.call_tool("echo", {"text": "hello"})
                    count += 1

            started = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            throughput[name] = count / (time.monotonic() - started)
    result: dict[str, Any] = {}
    for name, values in latencies.items():
        result[name] = {
            "p10_ms": round(percentile(values, 0.10), 3),
            "p50_ms": round(statistics.median(values), 3),
            "p99_ms": round(percentile(values, 0.99), 3),
            "calls_per_s": round(throughput[name], 1),
        }
    result["added"] = {
        "p10_ms": round(result["idgate"]["p10_ms"] - result["direct"]["p10_ms"], 3),
        "p50_ms": round(result["idgate"]["p50_ms"] - result["direct"]["p50_ms"], 3),
        "p99_ms": round(result["idgate"]["p99_ms"] - result["direct"]["p99_ms"], 3),
    }
    result["idgate"]["gateway_cpu_ms_per_call"] = round(gateway_cpu * 1000 / len(latencies["idgate"]), 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per side (default 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight for calls/s (default 16)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the calls/s phase per side")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--serve-tool", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_tool:
        serve_tool(args.serve_tool)
        return 0

    cpus = os.sched_getaffinity(0)
    pin = not args.no_pin and len(cpus) >= 2 and shutil.which("taskset") is not None
    gateway_cpu = str(min(cpus)) if pin else None
    others = ",".join(str(c) for c in sorted(cpus) if c != min(cpus)) if pin else None
    if others is not None:
        os.sched_setaffinity(0, {int(c) for c in others.split(",")})

    work = Path(tempfile.mkdtemp(prefix="idgate-mcp-bench-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        tool_port, gateway_port = free_port(), free_port()
        log = (work / "tool.log").open("wb")
        tool = subprocess.Popen(
            pinned([sys.executable, __file__, "--serve-tool", str(tool_port)], others), stdout=log, stderr=log
        )
        processes.append(tool)
        tool_url = f"http://127.0.0.1:{tool_port}/mcp"
        config = {
            "server": {"host": "127.0.0.1", "port": gateway_port},
            "dev_issuer": {"enabled": True},
            "mcp": {"servers": [{"name": "bench", "url": tool_url, "tools": {"echo": "read"}}]},
        }
        (work / "idgate.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "IDGATE_HOME": str(work / "state")}
        idgate = str(VENV_BIN / "idgate")
        glog = (work / "idgate.log").open("wb")
        gateway = subprocess.Popen(
            pinned([idgate, "serve", "--config", str(work / "idgate.yaml"), "--log-level", "warning"], gateway_cpu),
            stdout=glog,
            stderr=glog,
            env=env,
        )
        processes.append(gateway)
        wait_port(tool_port, tool)
        wait_port(gateway_port, gateway)
        token = (
            subprocess.run(
                [idgate, "token", "--config", str(work / "idgate.yaml"), "--sub", "bench", "--ttl", "3600"],
                check=True,
                capture_output=True,
                env=env,
            )
            .stdout.decode()
            .strip()
        )
        urls = {"direct": tool_url, "idgate": f"http://127.0.0.1:{gateway_port}/mcp/bench"}
        result = asyncio.run(measure(urls, token, args.calls, args.concurrency, args.duration, gateway.pid))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)

    result["settings"] = {
        "calls": args.calls,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "pinned": pin,
        "cpus": len(cpus),
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    print(f"{'':8} {'p10 ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>9}")
    for name in ("direct", "idgate"):
        row = result[name]
        print(f"{name:8} {row['p10_ms']:>8.3f} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {row['calls_per_s']:>9.1f}")
    added = result["added"]
    verdict = "met" if added["p50_ms"] < 2 else "NOT met"
    print(
        f"added    {added['p10_ms']:>8.3f} {added['p50_ms']:>8.3f} {added['p99_ms']:>8.3f}"
        f"   (target p50 < 2 ms: {verdict})"
    )
    load = result["settings"]["load_average_after"]
    print(f"load average after the run: {load:.2f} on {len(cpus)} CPUs (other work competing makes it noise)")
    print(f"idgate CPU per call (c1): {result['idgate']['gateway_cpu_ms_per_call']:.3f} ms")
    out = BENCH_DIR / "results" / "mcp.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
