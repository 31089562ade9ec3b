"""Token exchanges per second on one idgate worker (RFC 8693, `POST /oauth2/token`).

    .venv/bin/python bench/sts_bench.py             # 10 s cells, about 2 minutes
    .venv/bin/python bench/sts_bench.py --quick     # 3 s cells, under a minute
    make bench-sts

`idgate serve` runs alone on one CPU (one worker), trusting a human's OIDC
issuer (RS256, keys from a JWKS file) and a SPIFFE trust domain (ES256 JWT-SVID
bundle file), with the token service on and every exchange audited, as in
production. `wrk` (one thread, pinned with the script to the other CPU) posts
token-exchange forms: the subject token a human's access token, the actor token
an agent's JWT-SVID, asking for a narrower scope. Two workloads:

- **fixed**: the same subject and actor token every time. Both are verified
  once and then come from the gateway's verified-token cache: this measures the
  exchange itself (scope and audience rules, the policy decision, minting and
  signing the new token, the audit record).
- **distinct**: a subject token never seen before on every request (the actor
  token stays the same): each one costs a full RS256 verification too. The
  tokens are minted before each cell (on both CPUs while the gateway idles),
  enough for the measured rate; if wrk still runs out, it starts over and the
  cell is marked `reused` (some requests were cache hits).

Per cell: exchanges/s, p50/p99 latency (wrk's histogram), the gateway's CPU per
exchange and the one-core ceiling it implies (1 s / CPU per exchange: the
steadiest number on a shared host), failed requests (any non-200 counts), CPU
used by other processes (above 5 % of a core a fixed cell is measured again, up
to `--retries` times, and the quietest kept, marked noisy if it still is), and
for distinct cells how many distinct subjects the gateway had verified before:
its verified-token cache is bounded (10,000), so a cell after it filled shows
the steady state of a gateway that sees more distinct tokens than that within
their lifetime. Distinct cells are never measured again, as each changes that.
Results: a table on stdout and bench/results/sts.json. The goal is at least
1,000 exchanges/s.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cpu
import install
import loadgen
import procs
import report
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results" / "sts.json"

GOAL_EXCHANGES_PER_SECOND = 1_000.0
NOISY_OTHER_CPU_PCT = report.NOISY_OTHER_CPU_PCT

ISSUER = "https://idp.bench.example"
TRUST_DOMAIN = "agents.bench.example"
AGENT = f"spiffe://{TRUST_DOMAIN}/agents/bench-agent"
AUDIENCE = "idgate-bench"
TOKEN_TTL = 3600
EXCHANGE = {
    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
    "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
    "actor_token_type": "urn:ietf:params:oauth:token-type:jwt",
    "scope": "chat",
}

# Each request takes the next line of BODIES; past the last it starts over and says so at the end.
_DISTINCT_LUA = """
local bodies = {}
for line in io.lines(BODIES) do bodies[#bodies + 1] = line end
local next_body = 0
local wrapped = 0
request = function()
  next_body = next_body + 1
  if next_body > #bodies then next_body = 1; wrapped = wrapped + 1 end
  return wrk.format(nil, nil, nil, bodies[next_body])
end
"""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    duration: float
    warmup: float
    pin: bool
    idgate: Path
    results: Path
    max_tokens: int
    keep_work: bool
    retries: int


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Token exchanges per second on one idgate worker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--concurrency", default="1,16", help="comma-separated wrk connection counts")
    parser.add_argument("--quick", action="store_true", help="3 s cells, 1 s warm-up")
    parser.add_argument("--duration", type=float, help="seconds per cell (default 10, quick 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds (default 3, quick 1)")
    parser.add_argument("--max-tokens", type=int, default=60_000, help="most distinct subject tokens minted per cell")
    parser.add_argument("--retries", type=int, default=2, help="measure a noisy cell again this often")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--idgate", type=Path, default=REPO / ".venv" / "bin" / "idgate", help="idgate command")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file for the results")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (keys, config, state)")
    args = parser.parse_args(argv)
    try:
        concurrency = tuple(sorted({int(x) for x in args.concurrency.split(",") if x.strip()}))
    except ValueError:
        parser.error("--concurrency: comma-separated positive integers")
    if not concurrency or min(concurrency) < 1:
        parser.error("--concurrency: comma-separated positive integers")
    return Settings(
        concurrency=concurrency,
        duration=args.duration or (3.0 if args.quick else 10.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0),
        pin=not args.no_pin,
        idgate=args.idgate,
        results=args.results,
        max_tokens=max(1, args.max_tokens),
        keep_work=args.keep_work,
        retries=max(0, args.retries),
    )


# --- the identities: a human's issuer, an agent's trust domain -----------------------------------


@dataclass(frozen=True)
class Identities:
    human_key: RSAKey
    agent_key: ECKey

    @classmethod
    def create(cls, folder: Path) -> Identities:
        human_key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"})
        human_key.ensure_kid()
        agent_key = ECKey.generate_key("P-256", parameters={"use": "sig"})
        agent_key.ensure_kid()
        (folder / "issuer.jwks.json").write_text(json.dumps({"keys": [human_key.as_dict(private=False)]}))
        bundle = {"keys": [{**agent_key.as_dict(private=False), "use": "jwt-svid"}], "spiffe_sequence": 1}
        (folder / "bundle.jwks.json").write_text(json.dumps(bundle))
        return cls(human_key, agent_key)

    def actor_token(self) -> str:
        now = int(time.time())
        claims = {"sub": AGENT, "aud": [AUDIENCE], "iat": now, "exp": now + TOKEN_TTL, "task": "bench-task"}
        return jwt.encode({"alg": "ES256", "kid": self.agent_key.kid, "typ": "JWT"}, claims, self.agent_key)


def human_token(key: RSAKey, subject: str) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + TOKEN_TTL,
        "scope": "chat models:read",
        "tenant": "bench",
    }
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "at+jwt"}, claims, key)


def exchange_body(subject_token: str, actor_token: str) -> str:
    return urllib.parse.urlencode({**EXCHANGE, "subject_token": subject_token, "actor_token": actor_token})


_MINT_KEY: RSAKey | None = None


def _mint_init(private_jwk: dict[str, Any], cpus: set[int]) -> None:
    global _MINT_KEY
    os.sched_setaffinity(0, cpus)  # the gateway is idle while tokens are minted: use every CPU
    _MINT_KEY = RSAKey.import_key(private_jwk)


def _mint_bodies(prefix: str, count: int, actor_token: str) -> list[str]:
    assert _MINT_KEY is not None
    return [exchange_body(human_token(_MINT_KEY, f"{prefix}-{i}"), actor_token) for i in range(count)]


def mint_distinct(identities: Identities, prefix: str, count: int, actor_token: str) -> list[str]:
    """`count` exchange bodies, each with its own never-seen subject token (RS256 signing, in parallel)."""
    cpus = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    workers = max(1, len(cpus))
    chunk = math.ceil(count / workers)
    context = multiprocessing.get_context("fork")
    private = identities.human_key.as_dict(private=True)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_mint_init, initargs=(private, cpus)) as pool:
        parts = pool.map(
            _mint_bodies,
            [f"{prefix}-w{w}" for w in range(workers)],
            [min(chunk, count - w * chunk) for w in range(workers)],
            [actor_token] * workers,
        )
        return [body for part in parts for body in part]


# --- the gateway --------------------------------------------------------------------------------


def write_config(folder: Path, port: int) -> Path:
    (folder / "entities.yaml").write_text(
        f"entitlements:\n  - tenant: bench\n    models: [bench-model]\n    audiences: [{AUDIENCE}]\n"
    )
    config = folder / "idgate.yaml"
    config.write_text(
        f"""server: {{host: 127.0.0.1, port: 0, public_url: "http://127.0.0.1:{port}", audiences: [{AUDIENCE}]}}
state: {{home: {folder / "state"}}}
dev_issuer: {{enabled: false}}
issuers:
  - {{name: corp, issuer: "{ISSUER}", jwks_file: {folder / "issuer.jwks.json"}}}
spiffe:
  - name: mesh
    trust_domain: {TRUST_DOMAIN}
    jwks_file: {folder / "bundle.jwks.json"}
    tenant: bench
    rules: [{{path_prefix: /agents, kind: agent}}]
providers:
  - {{name: demo, type: demo}}
models:
  - {{name: bench-model, provider: demo}}
policy: {{entities: [{folder / "entities.yaml"}]}}
"""
    )
    return config


def check_exchange(url: str, body: str) -> dict[str, Any]:
    """One exchange that must succeed; the issued token's claims (not verified: the tests do that)."""
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise SystemExit(f"the token exchange failed: HTTP {error.code} {error.read()[:500]!r}") from None
    payload = answer["access_token"].split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    if claims.get("act", {}).get("sub") != AGENT or answer.get("scope") != "chat":
        raise SystemExit(f"the issued token is not what was asked for: {claims}")
    return claims


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Cell:
    workload: str  # "fixed" or "distinct"
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    gateway_cpu_us: float
    other_cpu_pct: float
    tokens: int = 0  # distinct: subject tokens available
    reused: bool = False  # distinct: wrk ran out of fresh tokens
    subjects_before: int = 0  # distinct: subject tokens the gateway had verified before this cell

    @property
    def noisy(self) -> bool:
        return self.other_cpu_pct > NOISY_OTHER_CPU_PCT

    @property
    def ceiling(self) -> float:
        """Exchanges/s that one core could serve at this CPU cost: steadier than `rps` on a busy host."""
        return 1e6 / self.gateway_cpu_us if self.gateway_cpu_us > 0 else 0.0


def measure(
    url: str, script: Path, workload: str, n: int, seconds: float, gateway_pid: int, load_cpu: int | None
) -> Cell:
    fields = loadgen.measured(url, script, connections=n, seconds=seconds, gateway_pid=gateway_pid, cpu_=load_cpu)
    return Cell(workload=workload, concurrency=n, **fields)


def wait_quiet(gateway_pid: int, budget: float = 10.0) -> None:
    cpu.wait_quiet([gateway_pid], [], budget, NOISY_OTHER_CPU_PCT)


def show(cell: Cell) -> None:
    say(
        f"[{cell.workload:8}] c{cell.concurrency:<3} {cell.rps:8,.0f} exchanges/s  p50 {cell.p50_ms:6.2f} ms"
        f"  p99 {cell.p99_ms:6.2f} ms  gw CPU {cell.gateway_cpu_us:5.0f} µs/exchange (ceiling {cell.ceiling:,.0f}/s)"
        f"  errors {cell.errors}"
        + (f"  after {cell.subjects_before:,} subjects" if cell.workload == "distinct" else "")
        + (f"  (reused tokens: {cell.tokens} for {cell.requests})" if cell.reused else "")
        + (f"  other CPU {cell.other_cpu_pct:.0f} % (noisy)" if cell.noisy else "")
    )


def table(cells: list[Cell]) -> str:
    lines = [
        "| workload | conns | exchanges/s | p50 ms | p99 ms | gw CPU µs/exchange | 1-core ceiling/s | errors | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        notes = [
            note
            for note, on in (
                (f"after {c.subjects_before:,} distinct subjects", c.workload == "distinct"),
                ("tokens reused", c.reused),
                (f"noisy ({c.other_cpu_pct:.0f} %)", c.noisy),
            )
            if on
        ]
        lines.append(
            f"| {c.workload} | {c.concurrency} | {c.rps:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f}"
            f" | {c.gateway_cpu_us:.0f} | {c.ceiling:,.0f} | {c.errors} | {', '.join(notes)} |"
        )
    return "\n".join(lines)


def run(settings: Settings) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    pin = settings.pin and len(cpus) >= 2 and shutil.which("taskset") is not None
    gateway_cpu, load_cpu = (cpus[0], cpus[1]) if pin else (None, None)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    work = Path(tempfile.mkdtemp(prefix="idgate-sts-bench-"))
    logs = work / "logs"
    logs.mkdir()
    install.ensure_wrk(logs / "install.log")
    say(f"scratch: {work}; " + (f"gateway on CPU {gateway_cpu}, wrk on CPU {load_cpu}" if pin else "no pinning"))
    identities = Identities.create(work)
    actor = identities.actor_token()
    cells: list[Cell] = []
    try:
        with procs.Processes(logs) as processes:
            port = procs.free_port()
            (work / "state").mkdir()
            config = write_config(work, port)
            env = {**os.environ, "IDGATE_HOME": str(work / "state")}
            argv = [str(settings.idgate), "serve", "--config", str(config), "--port", str(port), "--workers", "1"]
            gateway = processes.start("idgate", argv, cpu=gateway_cpu, env=env, cwd=work)
            procs.wait_http(gateway, f"http://127.0.0.1:{port}/healthz", timeout=60)
            url = f"http://127.0.0.1:{port}/oauth2/token"
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            fixed_body = exchange_body(human_token(identities.human_key, "bench-human"), actor)
            check_exchange(url, fixed_body)
            fixed = loadgen.write_script(work / "fixed.lua", fixed_body.encode(), headers)
            say(f"warm-up {settings.warmup:g}s")
            loadgen.run_wrk(url, fixed, connections=16, seconds=settings.warmup, cpu=load_cpu)
            fixed_rps: dict[int, float] = {}
            sent = 1  # distinct subject tokens sent so far (the fixed one)

            def fixed_cell(n: int, attempt: int) -> Cell:
                return measure(url, fixed, "fixed", n, settings.duration, gateway.pid, load_cpu)

            def distinct_cell(n: int, attempt: int) -> Cell:
                nonlocal sent
                # Fewer than the fixed workload's rate, as each also verifies a new RS256 signature.
                count = min(settings.max_tokens, math.ceil(fixed_rps[n] * (settings.duration + 1) * 1.1) + 100)
                say(f"minting {count:,} subject tokens for distinct c{n}")
                bodies = mint_distinct(identities, f"c{n}a{attempt}", count, actor)
                check_exchange(url, bodies.pop())  # one of them, through the gateway, before the cell
                body_file = work / f"distinct-c{n}.txt"
                body_file.write_text("\n".join(bodies) + "\n")
                script = loadgen.write_script(work / f"distinct-c{n}.lua", bodies[0].encode(), headers)
                with script.open("a") as lua:
                    lua.write(f'BODIES = "{body_file}"\n' + _DISTINCT_LUA)
                before = sent + 1
                wait_quiet(gateway.pid)
                cell = measure(url, script, "distinct", n, settings.duration, gateway.pid, load_cpu)
                cell.tokens = len(bodies)
                cell.reused = cell.requests > len(bodies)
                cell.subjects_before = before
                sent = before + min(cell.requests, len(bodies))
                return cell

            for workload, make_cell in (("fixed", fixed_cell), ("distinct", distinct_cell)):
                for n in settings.concurrency:
                    best: Cell | None = None
                    # A distinct cell changes what it measures (the gateway has seen more subjects): never again.
                    attempts = 1 + (settings.retries if workload == "fixed" else 0)
                    for attempt in range(attempts):
                        wait_quiet(gateway.pid)
                        cell = make_cell(n, attempt)
                        show(cell)
                        if best is None or cell.other_cpu_pct < best.other_cpu_pct:
                            best = cell
                        if not cell.noisy:
                            break
                        if attempt + 1 < attempts:
                            say(f"[{workload}] c{n}: other processes used {cell.other_cpu_pct:.0f} % of a core, again")
                    assert best is not None
                    cells.append(best)
                    if workload == "fixed":
                        fixed_rps[n] = best.rps
    finally:
        if not settings.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    concurrent = [c for c in cells if c.concurrency > 1] or cells
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "setup": {
            "workers": 1,
            "pinning": f"gateway CPU {gateway_cpu}, wrk CPU {load_cpu}" if pin else "none",
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "subject_token": "RS256 access token of a trusted OIDC issuer (JWKS file)",
            "actor_token": "ES256 JWT-SVID of a SPIFFE trust domain (bundle file)",
            "issued_token": "ES256 gateway token, scope narrowed, nested act; each exchange audited",
        },
        "cells": [{**asdict(c), "noisy": c.noisy, "ceiling_per_s": c.ceiling} for c in cells],
        "goal_exchanges_per_second": GOAL_EXCHANGES_PER_SECOND,
        # Measured: every cell with concurrency served the goal. By CPU: every cell cost little enough that one
        # core could (what a noisy host cannot hide).
        "goal_met": bool(cells) and all(c.rps >= GOAL_EXCHANGES_PER_SECOND for c in concurrent),
        "goal_met_by_cpu": bool(cells) and all(c.ceiling >= GOAL_EXCHANGES_PER_SECOND for c in cells),
        "table": table(cells),
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
    verdict = "met" if result["goal_met"] else "NOT met"
    by_cpu = "met" if result["goal_met_by_cpu"] else "NOT met"
    print(
        f"\ngoal, at least {GOAL_EXCHANGES_PER_SECOND:,.0f} exchanges/s on one worker:"
        f" measured with concurrency {verdict}; by gateway CPU per exchange {by_cpu}"
    )
    say(f"results: {settings.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
