"""Audit writer micro-benchmark: records/s the writer sustains, and what the pre-forward commit costs.

    .venv/bin/python bench/audit_bench.py                 # SQLite
    .venv/bin/python bench/audit_bench.py --postgres DSN  # and PostgreSQL (a schema of its own, dropped after)
    .venv/bin/python bench/audit_bench.py --e2e           # the gateway's c1 latency with and without the commit
    .venv/bin/python bench/audit_bench.py --stages        # CPU per request with each stage taken out in turn

Measures, with records shaped as the gateway writes them (identity, decision, model):

- **emit throughput**: records/s from `emit()` until committed (the writer thread's
  rate: canonical JSON, SHA-256 chain, one transaction per batch);
- **commit latency at c1**: one request at a time awaiting `commit(identity, decision)`,
  the wait invariant 6 adds before each upstream call (p50/p99);
- **commit throughput at c64**: 64 requests awaiting commits at once (group commit).
- with `--e2e`: `idgate serve`'s chat latency at c1 (and req/s at c64 with wrk) against
  the fast mock upstream, in three variants run in alternating slices so that the host's
  drift hits all alike: as shipped (`commit`: decision committed before forwarding), with
  the commit replaced by a plain enqueue (`enqueue`: the records still written, just not
  awaited) and with no records at all (`none`). commit - enqueue is what invariant 6
  costs; commit - none what the whole trail costs.
- with `--stages`: the gateway's CPU per request at c64 (wrk, alternating slices, pinned the
  same way) as shipped, with no trail, and with identity, classification or the policy
  decision each replaced by what it answered the first time; and the floor proxy: what
  each stage costs under load, next to what a bare proxy costs.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from idgate.audit.chain import checkpoint_signer
from idgate.audit.stores import PostgresStore, SqliteStore, Store
from idgate.audit.writer import AuditWriter
from idgate.sts.keys import SigningKeys


def records(n: int) -> list[dict[str, Any]]:
    """The three records of request `n`, with the fields and sizes the gateway writes."""
    base = {"v": 1, "request_id": f"req_{n:024x}", "trace_id": os.urandom(16).hex(), "time": time.time()}
    who = {"kind": "human", "id": "alice", "tenant": "acme", "issuer": "https://idp.example", "groups": ["eng"]}
    credential = {"kind": "jwt", "id": "sha256:0123456789abcdef", "issuer": "corp", "expires_at": 1.8e9}
    credential.update({"binding": "none", "task": None})
    identity = {**base, "kind": "identity", "method": "POST", "path": "/v1/chat/completions", "subject": who}
    identity.update({"actors": [], "credential": credential})
    decision = {**base, "kind": "decision", "subject": {"id": "alice", "tenant": "acme"}, "action": "invoke_model"}
    decision.update(
        {"resource": {"type": "model", "id": "gpt"}, "context": {"data_class": "internal", "tenant": "acme"}}
    )
    decision.update({"decision_id": f"dec_{n:020x}", "allowed": True, "reason": "allowed", "policies": ["p1"]})
    decision.update({"errors": [], "revision": "pol_0123456789abcdef0123", "denied_for": None, "findings": []})
    model = {**base, "kind": "model", "subject": {"id": "alice", "tenant": "acme"}, "provider": "up", "model": "gpt"}
    model.update({"upstream_model": "gpt-4o", "stream": False, "parameters": None, "data_class": "internal"})
    model.update({"prompt_sha256": "ab" * 32, "completion_sha256": "cd" * 32, "status": 200, "outcome": "ok"})
    model.update({"usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}, "latency_ms": 1.234})
    return [identity, decision, model]


def emit_throughput(store: Store, total: int) -> float:
    writer = AuditWriter(store=store, flush_interval=0.005)
    writer.start()
    batch = [r for n in range(total // 3) for r in records(n)]
    started = time.perf_counter()
    for record in batch:
        writer.emit(record)
    assert writer.flush(120)
    elapsed = time.perf_counter() - started
    writer.close()
    return len(batch) / elapsed


async def commit_latency(store: Store, count: int) -> tuple[float, float]:
    writer = AuditWriter(store=store, flush_interval=0.005)
    writer.start()
    waits: list[float] = []
    try:
        for n in range(count):
            identity, decision, _ = records(n)
            started = time.perf_counter()
            await writer.commit(identity, decision)
            waits.append(time.perf_counter() - started)
    finally:
        writer.close()
    waits.sort()
    return statistics.median(waits) * 1000, waits[int(len(waits) * 0.99)] * 1000


async def commit_throughput(store: Store, total: int, concurrency: int) -> tuple[float, int]:
    writer = AuditWriter(store=store, flush_interval=0.005)
    writer.start()
    counter = iter(range(total))

    async def one_caller() -> None:
        for n in counter:
            identity, decision, _ = records(n)
            await writer.commit(identity, decision)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one_caller() for _ in range(concurrency)))
    finally:
        elapsed = time.perf_counter() - started
        writer.close()
    return total / elapsed, writer.batches


def run(name: str, make: Any, args: argparse.Namespace) -> None:
    rate = emit_throughput(make(), args.records)
    p50, p99 = asyncio.run(commit_latency(make(), args.commits))
    commits, batches = asyncio.run(commit_throughput(make(), args.commits * 4, 64))
    print(f"{name}: emit {rate:,.0f} records/s; commit at c1 p50 {p50:.3f} ms p99 {p99:.3f} ms;", end=" ")
    print(f"commits at c64 {commits:,.0f}/s ({2 * commits:,.0f} records/s) in {batches} transactions")


VARIANTS = ("commit", "enqueue", "none")
"""As shipped; records emitted but not awaited before forwarding; no records at all."""

STAGES = ("commit", "none", "no-identity", "no-classify", "no-policy", "floor")
"""`--stages`: as shipped, then one stage at a time taken out of the request path, and the bare floor proxy."""


def _patch(variant: str) -> None:
    """Change this process's gateway into `variant` (before it is built).

    `no-identity`, `no-classify` and `no-policy` replace a stage by what it answered the first time it
    ran for the same input (the caller for a token, the classification, the decision): the rest of the
    request runs as shipped, so the difference in CPU is what that stage costs under load.
    """
    if variant == "enqueue":

        async def enqueue(self: AuditWriter, *records: dict[str, Any]) -> None:
            for record in records:
                self.emit(record)

        AuditWriter.commit = enqueue  # type: ignore[method-assign]
    elif variant == "none":  # no trail at all: what everything but the audit costs

        async def drop(self: AuditWriter, *records: dict[str, Any]) -> None:
            self.check()

        def drop_one(self: AuditWriter, record: dict[str, Any]) -> None:
            self.check()

        AuditWriter.commit = drop  # type: ignore[method-assign]
        AuditWriter.emit = drop_one  # type: ignore[method-assign]
    elif variant == "no-identity":
        from idgate.identity.gate import Gate
        from idgate.identity.principal import Caller
        from idgate.proxy.http import Request

        callers: dict[bytes | None, Caller] = {}
        identify = Gate.caller

        async def known(self: Gate, request: Request) -> Caller:
            token = request.header(b"authorization")
            if token not in callers:
                callers[token] = await identify(self, request)
            return callers[token]

        Gate.caller = known  # type: ignore[method-assign]
    elif variant == "no-classify":
        from idgate.classify.classifier import Classification, Classifier

        first: list[Classification] = []
        classify = Classifier.classify

        def same(self: Classifier, body: Mapping[str, Any]) -> Classification:
            if not first:
                first.append(classify(self, body))
            return first[0]

        Classifier.classify = same  # type: ignore[method-assign]
    elif variant == "no-policy":
        from idgate.identity.principal import Caller
        from idgate.policy.cedar import CedarAuthorizer
        from idgate.policy.decision import Decision, Resource

        decisions: dict[tuple[Any, ...], Decision] = {}
        authorize = CedarAuthorizer.authorize

        def remembered(
            self: CedarAuthorizer, caller: Caller, action: str, resource: Resource, context: Mapping[str, Any]
        ) -> Decision:
            key = (caller.credential.id, action, resource.kind, resource.id, tuple(sorted(context.items())))
            if key not in decisions:
                decisions[key] = authorize(self, caller, action, resource, context)
            return decisions[key]

        CedarAuthorizer.authorize = remembered  # type: ignore[method-assign]
    elif variant not in ("commit", "floor"):
        raise SystemExit(f"unknown variant {variant}")


def _serve(variant: str, config: str, port: int) -> None:
    """Run `variant` in this process: the gateway as `idgate serve` runs it, or (`floor`) the bare proxy."""
    if variant == "floor":
        from floor_proxy import main as floor

        raise SystemExit(floor(["--port", str(port), "--upstream", os.environ["BENCH_FLOOR_UPSTREAM"]]))
    _patch(variant)
    from idgate.cli import main as idgate

    raise SystemExit(idgate(["serve", "--config", config, "--port", str(port), "--log-level", "warning"]))


def _wait_ready(port: int, path: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", path)
            if connection.getresponse().status < 500:
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")


def _slice(port: int, token: str, count: int) -> list[float]:
    body = orjson.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hello there"}]})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    waits = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body, headers)
        response = connection.getresponse()
        response.read()
        waits.append(time.perf_counter() - started)
        assert response.status == 200, response.status
    connection.close()
    return waits


def e2e(args: argparse.Namespace) -> None:
    here = Path(__file__).resolve().parent
    variants = STAGES if args.stages else VARIANTS
    # why: as bench/run.py does on 2+ cores: the gateways on CPU 0, everything else (this process, its
    # client, wrk, the mock upstream) on CPU 1, so a gateway's numbers are its own CPU's.
    pin = (os.cpu_count() or 1) >= 2
    gateway_cpu, load_cpu = (0, 1) if pin else (None, None)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    with tempfile.TemporaryDirectory() as folder:
        upstream = subprocess.Popen(
            [sys.executable, str(here / "mock_upstream.py"), "--port", "0"], stdout=subprocess.PIPE, text=True
        )
        processes: list[subprocess.Popen[Any]] = [upstream]
        try:
            assert upstream.stdout is not None
            upstream_port = int(upstream.stdout.readline().split()[1])
            env = {**os.environ, "IDGATE_HOME": folder, "BENCH_UPSTREAM_KEY": "sk-bench"}
            env["BENCH_FLOOR_UPSTREAM"] = f"http://127.0.0.1:{upstream_port}"
            config = Path(folder) / "idgate.yaml"
            config.write_text(
                "dev_issuer: {enabled: true, tenant: bench}\n"
                "providers:\n"
                f"  - {{name: mock, type: openai, base_url: 'http://127.0.0.1:{upstream_port}/v1',"
                " api_key: {env: BENCH_UPSTREAM_KEY}}\n"
                "models:\n  - {name: bench-model, provider: mock}\n"
            )
            token = subprocess.run(
                [sys.executable, "-m", "idgate", "token", "--config", str(config), "--ttl", "3600"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[-1]
            ports, pids = {}, {}
            for variant in variants:
                ports[variant] = port = _free_port()
                argv = [sys.executable, __file__, "--serve", variant, str(config), str(port)]
                if gateway_cpu is not None:
                    argv = ["taskset", "-c", str(gateway_cpu), *argv]
                process = subprocess.Popen(argv, env=env)
                processes.append(process)
                pids[variant] = process.pid  # why: taskset execs, so this is the server's own pid
                _wait_ready(port, "/healthz", time.monotonic() + 30)
            waits: dict[str, list[float]] = {variant: [] for variant in variants if not args.stages}
            for variant in waits:
                _slice(ports[variant], token, 300)  # warm-up
            for _ in range(args.slices):
                for variant in waits:
                    waits[variant] += _slice(ports[variant], token, args.per_slice)
            cells: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
            if shutil.which("wrk"):
                import loadgen

                body = orjson.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hello there"}]})
                headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                script = loadgen.write_script(Path(folder) / "chat.lua", body, headers)
                for _ in range(args.slices if args.stages else 3):
                    for variant in cells:
                        url = f"http://127.0.0.1:{ports[variant]}/v1/chat/completions"
                        cell = loadgen.measured(
                            url, script, connections=64, seconds=3, gateway_pid=pids[variant], cpu_=load_cpu
                        )
                        assert cell["errors"] == 0, cell
                        cells[variant].append(cell)
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)
    if waits:
        _print_latency(waits)
    shipped = statistics.median(c["gateway_cpu_us"] for c in cells["commit"]) if cells["commit"] else 0.0
    for variant, measured in cells.items():
        rps = statistics.median(c["rps"] for c in measured)
        cpu_us = statistics.median(c["gateway_cpu_us"] for c in measured)
        saved = f", {shipped - cpu_us:+,.0f} µs vs as shipped" if variant not in ("commit", "floor") else ""
        print(f"e2e chat c64 (wrk), {variant:11}: {rps:7,.0f} req/s, CPU {cpu_us:4,.0f} µs/request{saved}", end="")
        print(f" (median of {len(measured)} slices)")


def _print_latency(waits: dict[str, list[float]]) -> None:
    for variant, values in waits.items():
        values.sort()
        p50, p99 = statistics.median(values) * 1000, values[int(len(values) * 0.99)] * 1000
        print(f"e2e chat c1, {variant:8}: p50 {p50:.3f} ms, p99 {p99:.3f} ms ({len(values)} requests)")
    added_p50 = (statistics.median(waits["commit"]) - statistics.median(waits["enqueue"])) * 1000
    added_p99 = (
        waits["commit"][int(len(waits["commit"]) * 0.99)] - waits["enqueue"][int(len(waits["enqueue"]) * 0.99)]
    ) * 1000
    print(f"the pre-forward commit adds p50 {added_p50:.3f} ms, p99 {added_p99:.3f} ms at c1")
    whole = (statistics.median(waits["commit"]) - statistics.median(waits["none"])) * 1000
    print(f"the whole audit trail (records, journal, writer) adds p50 {whole:.3f} ms at c1")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        _serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=60_000, help="records for the emit throughput")
    parser.add_argument("--commits", type=int, default=2_000, help="commits for the c1 latency")
    parser.add_argument("--postgres", metavar="DSN", help="also measure PostgreSQL at DSN")
    parser.add_argument(
        "--e2e", action="store_true", help="measure the gateway's c1 latency with and without the commit"
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="with --e2e: CPU per request at c64 with each stage taken out in turn, and the floor",
    )
    parser.add_argument("--slices", type=int, default=10, help="--e2e: alternating slices per variant")
    parser.add_argument("--per-slice", type=int, default=500, help="--e2e: requests per slice")
    args = parser.parse_args()
    if args.e2e or args.stages:
        e2e(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        sign = checkpoint_signer(SigningKeys.open(Path(folder) / "keys"))
        counter = iter(range(1_000_000))
        run("sqlite", lambda: SqliteStore(Path(folder) / f"audit{next(counter)}.db", sign=sign), args)
        if args.postgres:
            schema = f"idgate_audit_bench_{os.getpid()}"
            try:
                run("postgres", lambda: PostgresStore(args.postgres, schema, sign=sign), args)
            finally:
                PostgresStore(args.postgres, schema).drop()


if __name__ == "__main__":
    main()
