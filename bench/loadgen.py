"""Drive `wrk` (one thread, N connections) with a Lua script for a POST body.

The script's ``done`` hook prints one line of JSON with the totals and the
latency percentiles straight from wrk's histogram (microseconds), so nothing
depends on wrk's human-readable output.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cpu
import procs

_MARK = "BENCHJSON "

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,'
    .. '"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,'
    .. '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f}\\n',
    MARK, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def _lua_string(text: str) -> str:
    """`text` as a Lua long-bracket literal that cannot be closed early."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def write_script(path: Path, body: bytes, headers: Mapping[str, str]) -> Path:
    """A wrk Lua script that POSTs `body` with `headers` and reports as JSON."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body.decode())}"]
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]
    lines.append(f"MARK = {_lua_string(_MARK)}")
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    socket_errors: int  # connect + read + write + timeout
    bad_status: int  # responses outside 2xx/3xx

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.bad_status


class WrkError(RuntimeError):
    pass


def run_wrk(
    url: str,
    script: Path,
    *,
    connections: int,
    seconds: float,
    cpu: int | None,
    timeout_s: float = 10.0,
) -> WrkResult:
    """Run wrk for `seconds` with one thread and `connections` keep-alive connections."""
    argv = procs.pinned(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout_s:g}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        cpu,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            break
    else:
        raise WrkError(f"wrk gave no result (exit {done.returncode}): {done.stderr.strip()[:500]}")
    return WrkResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1e3,
        p90_ms=data["p90_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        mean_ms=data["mean_us"] / 1e3,
        max_ms=data["max_us"] / 1e3,
        socket_errors=int(data["connect"] + data["read"] + data["write"] + data["timeout"]),
        bad_status=int(data["status"]),
    )


def measured(
    url: str, script: Path, *, connections: int, seconds: float, gateway_pid: int, cpu_: int | None
) -> dict[str, Any]:
    """wrk against one gateway process with its CPU accounted: the fields every benchmark cell has."""
    with cpu.Window([gateway_pid], []) as window:
        result = run_wrk(url, script, connections=connections, seconds=seconds, cpu=cpu_)
    return {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "requests": result.requests,
        "errors": result.errors,
        "gateway_cpu_us": window.gateway_us(result.requests),
        "other_cpu_pct": window.other_pct,
    }
