"""Gateway throughput with DPoP-bound tokens (a fresh proof every call) against plain bearer tokens.

    .venv/bin/python bench/dpop_bench.py            # 8 s cells, two rounds: about 2 minutes
    .venv/bin/python bench/dpop_bench.py --quick    # 3 s cells, one round
    make bench-dpop

`idgate serve` runs alone on one CPU (one worker), in front of the benchmark's
mock upstream (`mock_upstream.py`), with the development issuer. Two gateway
tokens come from its own token service (`POST /oauth2/token`, token exchange of
a development token): one plain bearer token, and one DPoP-bound token (the
request carried a proof, so the token has `cnf.jkt`). Both are ES256 gateway
tokens, verified once and then served from the verified-token cache: the only
difference between the workloads is the DPoP check of every call: the proof's
ES256 signature, `htm`/`htu`/`iat`/`ath`/thumbprint, and the `jti` insert into
the replay cache (SQLite in the state folder, shared by every worker).

`wrk` (one thread, pinned with the mock and this script to the other CPU)
posts chat completions. Every DPoP request carries a proof never used before:
the proofs are signed before each cell (outside the timed loop, so the load
generator is never the bottleneck) and wrk takes the next one per request; if
it runs out, it starts over and those replays are refused (counted as errors,
the cell marked `reused`). Bearer and DPoP cells alternate, `--rounds` times,
at each concurrency; the table gives the median of each, and the ratio
DPoP/bearer from the same run. Results: a table on stdout and
bench/results/dpop.json.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cpu
import install
import loadgen
import procs
import report
import targets
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results" / "dpop.json"
MODEL = targets.MODEL
NOISY_OTHER_CPU_PCT = report.NOISY_OTHER_CPU_PCT
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}).encode()

# Each request takes the next proof of PROOFS; past the last it starts over (replays: refused).
_PROOFS_LUA = """
local proofs = {}
for line in io.lines(PROOFS) do proofs[#proofs + 1] = line end
local next_proof = 0
request = function()
  next_proof = next_proof + 1
  if next_proof > #proofs then next_proof = 1 end
  wrk.headers["DPoP"] = proofs[next_proof]
  return wrk.format()
end
"""
# The bearer workload formats each request too, so that both cost wrk the same.
_PLAIN_LUA = """
request = function()
  return wrk.format()
end
"""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    duration: float
    warmup: float
    rounds: int
    pin: bool
    idgate: Path
    results: Path
    max_proofs: int


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Gateway throughput with DPoP-bound tokens against bearer tokens.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--concurrency", default="1,16", help="comma-separated wrk connection counts")
    parser.add_argument("--quick", action="store_true", help="3 s cells, 1 s warm-up, one round")
    parser.add_argument("--duration", type=float, help="seconds per cell (default 8, quick 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds (default 3, quick 1)")
    parser.add_argument("--rounds", type=int, help="bearer/DPoP cell pairs per concurrency (default 2, quick 1)")
    parser.add_argument("--max-proofs", type=int, default=80_000, help="most proofs signed per cell")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--idgate", type=Path, default=REPO / ".venv" / "bin" / "idgate", help="idgate command")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        concurrency = tuple(sorted({int(x) for x in args.concurrency.split(",") if x.strip()}))
    except ValueError:
        parser.error("--concurrency: comma-separated positive integers")
    if not concurrency or min(concurrency) < 1:
        parser.error("--concurrency: comma-separated positive integers")
    return Settings(
        concurrency=concurrency,
        duration=args.duration or (3.0 if args.quick else 8.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0),
        rounds=max(1, args.rounds or (1 if args.quick else 2)),
        pin=not args.no_pin,
        idgate=args.idgate,
        results=args.results,
        max_proofs=max(100, args.max_proofs),
    )


# --- the client's DPoP key, and its proofs ---------------------------------------------------------


class ProofSigner:
    """An ES256 DPoP key; `proofs(n, ...)` signs n proofs for one method, URL and token (RFC 9449 §4.2)."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        numbers = self._key.public_key().public_numbers()
        self.jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64(numbers.x.to_bytes(32, "big")),
            "y": b64(numbers.y.to_bytes(32, "big")),
        }
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk}
        self._header = b64(json.dumps(header, separators=(",", ":")).encode())

    def proof(self, method: str, url: str, token: str | None = None) -> str:
        return self.proofs(1, method, url, token)[0]

    def proofs(self, count: int, method: str, url: str, token: str | None) -> list[str]:
        base: dict[str, Any] = {"htm": method, "htu": url}
        if token is not None:
            base["ath"] = b64(hashlib.sha256(token.encode()).digest())
        out = []
        for _ in range(count):
            claims = {**base, "jti": secrets.token_urlsafe(12), "iat": int(time.time())}
            signing_input = f"{self._header}.{b64(json.dumps(claims, separators=(',', ':')).encode())}"
            r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
            out.append(f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
        return out


# --- the gateway --------------------------------------------------------------------------------------


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def gateway_token(base: str, subject: str, proof: str | None) -> str:
    """A gateway token from the token service: DPoP-bound when a proof comes with the request."""
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": subject,
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
    }
    headers = {"Content-Type": "application/x-www-form-urlencoded", **({"DPoP": proof} if proof else {})}
    status, answer = post(f"{base}/oauth2/token", urllib.parse.urlencode(form).encode(), headers)
    expected = "DPoP" if proof else "Bearer"
    if status != 200 or answer.get("token_type") != expected:
        raise SystemExit(f"the token service did not issue a {expected} token: {status} {answer}")
    token: str = answer["access_token"]
    return token


def check_chat(url: str, headers: dict[str, str], expect: int = 200) -> None:
    status, answer = post(url, CHAT, {"Content-Type": "application/json", **headers})
    if status != expect:
        raise SystemExit(f"a check request answered {status} (expected {expect}): {answer}")


# --- measuring ------------------------------------------------------------------------------------------


@dataclass
class Cell:
    workload: str  # "bearer" or "dpop"
    concurrency: int
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    gateway_cpu_us: float
    other_cpu_pct: float
    proofs: int = 0
    reused: bool = False

    @property
    def noisy(self) -> bool:
        return self.other_cpu_pct > NOISY_OTHER_CPU_PCT


def measure(
    url: str, script: Path, workload: str, n: int, rnd: int, seconds: float, pid: int, load: int | None
) -> Cell:
    fields = loadgen.measured(url, script, connections=n, seconds=seconds, gateway_pid=pid, cpu_=load)
    return Cell(workload=workload, concurrency=n, round=rnd, **fields)


def wait_quiet(pid: int, budget: float = 10.0) -> None:
    cpu.wait_quiet([pid], [], budget, NOISY_OTHER_CPU_PCT)


def show(cell: Cell) -> None:
    say(
        f"[{cell.workload:6}] c{cell.concurrency:<3} round {cell.round}  {cell.rps:8,.0f} req/s"
        f"  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms  gw CPU {cell.gateway_cpu_us:5.0f} µs/req"
        f"  errors {cell.errors}"
        + (f"  (proofs reused: {cell.proofs} for {cell.requests})" if cell.reused else "")
        + (f"  other CPU {cell.other_cpu_pct:.0f} % (noisy)" if cell.noisy else "")
    )


def summarize(cells: list[Cell], concurrency: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for n in concurrency:
        row: dict[str, Any] = {"concurrency": n}
        for workload in ("bearer", "dpop"):
            mine = [c for c in cells if c.workload == workload and c.concurrency == n]
            row[workload] = {
                "rps": statistics.median(c.rps for c in mine),
                "p50_ms": statistics.median(c.p50_ms for c in mine),
                "p99_ms": statistics.median(c.p99_ms for c in mine),
                "gateway_cpu_us": statistics.median(c.gateway_cpu_us for c in mine),
                "errors": sum(c.errors for c in mine),
                "noisy": any(c.noisy for c in mine),
                "reused": any(c.reused for c in mine),
            }
        row["rps_ratio"] = row["dpop"]["rps"] / row["bearer"]["rps"] if row["bearer"]["rps"] else 0.0
        row["cpu_added_us"] = row["dpop"]["gateway_cpu_us"] - row["bearer"]["gateway_cpu_us"]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| conns | bearer req/s | DPoP req/s | DPoP/bearer | bearer p50 / p99 ms | DPoP p50 / p99 ms"
        " | bearer gw CPU µs/req | DPoP gw CPU µs/req | DPoP adds µs/req | errors | note |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        bearer, dpop = r["bearer"], r["dpop"]
        notes = [n for n, on in (("noisy", bearer["noisy"] or dpop["noisy"]), ("proofs reused", dpop["reused"])) if on]
        lines.append(
            f"| {r['concurrency']} | {bearer['rps']:,.0f} | {dpop['rps']:,.0f} | {r['rps_ratio']:.0%}"
            f" | {bearer['p50_ms']:.2f} / {bearer['p99_ms']:.2f} | {dpop['p50_ms']:.2f} / {dpop['p99_ms']:.2f}"
            f" | {bearer['gateway_cpu_us']:.0f} | {dpop['gateway_cpu_us']:.0f} | {r['cpu_added_us']:.0f}"
            f" | {bearer['errors'] + dpop['errors']} | {', '.join(notes)} |"
        )
    return "\n".join(lines)


def run(settings: Settings) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    pin = settings.pin and len(cpus) >= 2 and shutil.which("taskset") is not None
    gateway_cpu, load_cpu = (cpus[0], cpus[1]) if pin else (None, None)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    work = Path(tempfile.mkdtemp(prefix="idgate-dpop-bench-"))
    logs = work / "logs"
    logs.mkdir()
    install.ensure_wrk(logs / "install.log")
    say(f"scratch: {work}; " + (f"gateway on CPU {gateway_cpu}, wrk on CPU {load_cpu}" if pin else "no pinning"))
    signer = ProofSigner()
    cells: list[Cell] = []
    try:
        with procs.Processes(logs) as processes:
            mock_port = procs.free_port()
            mock = processes.start(
                "mock-upstream",
                [sys.executable, str(BENCH_DIR / "mock_upstream.py"), "--port", str(mock_port)],
                cpu=load_cpu,
            )
            upstream = f"http://127.0.0.1:{mock_port}"
            procs.wait_http(mock, f"{upstream}/health", timeout=30)
            port = procs.free_port()
            (work / "state").mkdir()
            config = targets.idgate_config(work, port, upstream)
            env = {**os.environ, "IDGATE_HOME": str(work / "state"), "BENCH_UPSTREAM_KEY": "sk-bench"}
            subject = subprocess.run(
                [str(settings.idgate), "token", "--config", str(config), "--sub", "bench-user", "--ttl", "3600"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=True,
            ).stdout.split()[-1]
            argv = [str(settings.idgate), "serve", "--config", str(config), "--port", str(port), "--workers", "1"]
            gateway = processes.start("idgate", argv, cpu=gateway_cpu, env=env, cwd=work)
            base = f"http://127.0.0.1:{port}"
            procs.wait_http(gateway, f"{base}/healthz", timeout=60)
            url = f"{base}/v1/chat/completions"
            bearer = gateway_token(base, subject, None)
            bound = gateway_token(base, subject, signer.proof("POST", f"{base}/oauth2/token"))
            # Before measuring: both work, and a replayed proof is refused (the check is on).
            check_chat(url, {"Authorization": f"Bearer {bearer}"})
            proof = signer.proof("POST", url, bound)
            check_chat(url, {"Authorization": f"DPoP {bound}", "DPoP": proof})
            check_chat(url, {"Authorization": f"DPoP {bound}", "DPoP": proof}, expect=401)
            json_headers = {"Content-Type": "application/json"}
            plain = loadgen.write_script(
                work / "bearer.lua", CHAT, {**json_headers, "Authorization": f"Bearer {bearer}"}
            )
            with plain.open("a") as lua:
                lua.write(_PLAIN_LUA)
            say(f"warm-up {settings.warmup:g}s")
            loadgen.run_wrk(url, plain, connections=16, seconds=settings.warmup, cpu=load_cpu)
            for n in settings.concurrency:
                for rnd in range(1, settings.rounds + 1):
                    wait_quiet(gateway.pid)
                    cell = measure(url, plain, "bearer", n, rnd, settings.duration, gateway.pid, load_cpu)
                    show(cell)
                    cells.append(cell)
                    # Enough fresh proofs for the bearer rate (DPoP is slower), signed before the timed loop.
                    count = min(settings.max_proofs, int(cell.rps * (settings.duration + 1) * 1.1) + 200)
                    started = time.monotonic()
                    proofs = signer.proofs(count, "POST", url, bound)
                    say(f"signed {count:,} proofs in {time.monotonic() - started:.1f} s")
                    proof_file = work / f"proofs-c{n}-r{rnd}.txt"
                    proof_file.write_text("\n".join(proofs) + "\n")
                    script = loadgen.write_script(
                        work / f"dpop-c{n}-r{rnd}.lua", CHAT, {**json_headers, "Authorization": f"DPoP {bound}"}
                    )
                    with script.open("a") as lua:
                        lua.write(f'PROOFS = "{proof_file}"\n' + _PROOFS_LUA)
                    wait_quiet(gateway.pid)
                    cell = measure(url, script, "dpop", n, rnd, settings.duration, gateway.pid, load_cpu)
                    cell.proofs = count
                    cell.reused = cell.requests > count
                    show(cell)
                    cells.append(cell)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(cells, settings.concurrency)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "setup": {
            "workers": 1,
            "pinning": f"gateway CPU {gateway_cpu}, wrk + mock CPU {load_cpu}" if pin else "none",
            "duration_s": settings.duration,
            "rounds": settings.rounds,
            "tokens": "ES256 gateway tokens from the token service (verified once, then cached)",
            "proof": "ES256, a new jti per request, replay cache in STATE/replay.db",
        },
        "cells": [{**asdict(c), "noisy": c.noisy} for c in cells],
        "summary": rows,
        "table": table(rows),
    }


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        result = run(settings)
    except (procs.StartError, loadgen.WrkError, install.InstallError, subprocess.SubprocessError) as exc:
        say(f"failed: {exc}")
        return 1
    settings.results.parent.mkdir(parents=True, exist_ok=True)
    settings.results.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    say(f"results: {settings.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
