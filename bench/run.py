"""Benchmark idgate against a bare proxy floor and LiteLLM, on one mock upstream.

    .venv/bin/python bench/run.py            # everything, 10 s per cell
    .venv/bin/python bench/run.py --quick    # ~3 s per cell
    .venv/bin/python bench/run.py --only floor,idgate --duration 5

For each target (direct, floor, litellm, idgate), mode (chat: JSON answer;
stream: SSE) and concurrency (1, 16, 64 connections): requests/s and p50/p99
latency with wrk, and for streams the time to first body byte with a small
probe. The gateway under test runs alone on one CPU; wrk, the probe and the
mock upstream share the other. Results: a table on stdout, and
bench/results/latest.json and latest.md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import cpu
import install
import loadgen
import probe
import procs
import report
import targets

BENCH_DIR = Path(__file__).resolve().parent
MODES = ("chat", "stream")
QUIET_BUDGET_CELLS = 6  # a run waits for quiet at most this many times --quiet-wait in all


@dataclass(frozen=True)
class Settings:
    targets: tuple[str, ...]
    modes: tuple[str, ...]
    concurrency: tuple[int, ...]
    duration: float
    warmup: float
    ttfb_seconds: float
    ttfb_requests: int
    results: Path
    pin: bool
    keep_work: bool
    retries: int
    quiet_wait: float
    idgate: Path
    litellm_venv: Path


def _csv(kind: type[int] | type[str], allowed: tuple[str, ...] = ()) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type for a comma-separated list of `kind`, each one of `allowed` if given."""

    def parse(text: str) -> tuple[Any, ...]:
        items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        bad = [x for x in items if (allowed and x not in allowed) or (isinstance(x, int) and x < 1)]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(allowed) or kind.__name__}"
            )
        return items

    return parse


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Benchmark idgate against a bare proxy floor and LiteLLM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    names = targets.NAMES
    parser.add_argument(
        "--only", type=_csv(str, names), default=names, help=f"targets to measure, from {','.join(names)}"
    )
    parser.add_argument("--modes", type=_csv(str, MODES), default=MODES)
    parser.add_argument("--concurrency", type=_csv(int), default=(1, 16, 64), help="connections per cell")
    parser.add_argument("--quick", action="store_true", help="short cells (3 s, 1 s warm-up, smaller TTFB samples)")
    parser.add_argument("--duration", type=float, help="seconds per cell (default 10, quick 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per mode (default 3, quick 1)")
    parser.add_argument("--ttfb-requests", type=int, help="stream requests per TTFB sample (default 2000, quick 300)")
    parser.add_argument(
        "--retries",
        type=int,
        help="measure a cell again this often while other processes disturb it (default 2, quick 1)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait at most for other processes to calm down (default 30, quick 10)",
    )
    parser.add_argument("--idgate", type=Path, default=targets.REPO / ".venv" / "bin" / "idgate", help="idgate command")
    parser.add_argument(
        "--litellm-venv",
        type=Path,
        default=BENCH_DIR / ".venv-litellm",
        help="virtualenv for LiteLLM (made if missing)",
    )
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the scratch folder (configs, state) for inspection"
    )
    args = parser.parse_args(argv)
    duration = args.duration or (3.0 if args.quick else 10.0)
    return Settings(
        targets=tuple(n for n in names if n in args.only),
        modes=tuple(m for m in MODES if m in args.modes),
        concurrency=tuple(sorted(set(args.concurrency))),
        duration=duration,
        warmup=args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0),
        ttfb_seconds=min(duration, 5.0),
        ttfb_requests=args.ttfb_requests or (300 if args.quick else 2000),
        results=args.results,
        pin=not args.no_pin,
        keep_work=args.keep_work,
        retries=args.retries if args.retries is not None else (1 if args.quick else 2),
        quiet_wait=args.quiet_wait if args.quiet_wait is not None else (10.0 if args.quick else 30.0),
        idgate=args.idgate,
        litellm_venv=args.litellm_venv,
    )


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- what is sent and what counts as a good answer -------------------------------------------


def request_body(model: str, stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello in five words."},
        ],
        "max_tokens": 32,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def check_answer(mode: str, answer: probe.Answer) -> str | None:
    """None for a proper answer, else what is wrong with it."""
    snippet = answer.body[:300].decode(errors="replace")
    if answer.status != 200:
        return f"HTTP {answer.status}: {snippet}"
    if mode == "stream":
        kind = answer.headers.get("content-type", "")
        if not kind.startswith("text/event-stream"):
            return f"content-type {kind!r} is not text/event-stream"
        if b"data: [DONE]" not in answer.body or b"chat.completion.chunk" not in answer.body:
            return f"not a complete chat.completion.chunk stream: {snippet}"
        return None
    try:
        data = json.loads(answer.body)
    except ValueError:
        return f"not JSON: {snippet}"
    if not isinstance(data, dict) or not data.get("choices"):
        return f"no choices in the answer: {snippet}"
    return None


def smoke(endpoint: targets.Endpoint, modes: tuple[str, ...]) -> None:
    for mode in modes:
        body = request_body(endpoint.model, mode == "stream")
        try:
            answer = probe.run_async(probe.fetch(endpoint.url, body, endpoint.headers))
        except (probe.ProbeError, OSError, TimeoutError) as exc:
            raise targets.Unavailable(f"{mode} request failed: {exc}") from None
        problem = check_answer(mode, answer)
        if problem is not None:
            raise targets.Unavailable(f"{mode} request answered badly: {problem}")


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    gateway_cpu: int | None
    load_cpu: int | None

    @classmethod
    def choose(cls, pin: bool) -> Layout:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(cpus[0], cpus[1])

    def describe(self) -> str:
        if self.gateway_cpu is None:
            return "no CPU pinning"
        return f"gateway pinned to CPU {self.gateway_cpu}, wrk + probe + mock upstream to CPU {self.load_cpu}"


class Bench:
    def __init__(self, settings: Settings, layout: Layout, work: Path, mock_pid: int) -> None:
        self.s = settings
        self.layout = layout
        self.work = work
        self.mock_pid = mock_pid
        self.quiet_budget = QUIET_BUDGET_CELLS * settings.quiet_wait  # all waiting for quiet, in seconds

    def measure(self, name: str, endpoint: targets.Endpoint, into: report.Report) -> None:
        scripts = {
            mode: loadgen.write_script(
                self.work / f"{name}-{mode}.lua", request_body(endpoint.model, mode == "stream"), endpoint.headers
            )
            for mode in self.s.modes
        }
        for mode, script in scripts.items():
            say(f"[{name}] warm-up {mode} {self.s.warmup:g}s")
            self._wrk(endpoint, script, min(16, max(self.s.concurrency)), self.s.warmup)
        for mode, script in scripts.items():
            for n in self.s.concurrency:
                cell = self._steady_cell(name, mode, n, endpoint, script)
                into.cells.append(cell)
                say(
                    f"[{name}] {mode:6} c{n:<3} {cell.rps:9,.0f} req/s  p50 {cell.p50_ms:7.2f} ms"
                    f"  p99 {cell.p99_ms:7.2f} ms"
                    + (f"  TTFB p50 {cell.ttfb_p50_ms:6.2f} ms" if cell.ttfb_p50_ms else "")
                    + f"  errors {cell.errors}"
                    + (f"+{cell.ttfb_errors}" if cell.ttfb_errors else "")
                    + (f"  other CPU {cell.other_cpu_pct:.0f} %" if cell.noisy else "")
                )
                if cell.requests == 0 or cell.errors >= cell.requests:
                    raise targets.Unavailable(f"stopped answering during {mode} c{n}: {cell.ttfb_first_error}")

    def _steady_cell(self, name: str, mode: str, n: int, endpoint: targets.Endpoint, script: Path) -> report.Cell:
        """Measure a cell; while other processes disturb it, wait for quiet and measure again."""
        best: report.Cell | None = None
        for attempt in range(1 + self.s.retries):
            self._wait_quiet(endpoint)
            cell = self._cell(name, mode, n, endpoint, script)
            if best is None or cell.other_cpu_pct < best.other_cpu_pct:
                best = cell
            if not cell.noisy:
                break
            if attempt < self.s.retries:
                say(f"[{name}] {mode} c{n}: other processes used {cell.other_cpu_pct:.0f} % of a core, measuring again")
        assert best is not None
        return best

    def _wait_quiet(self, endpoint: targets.Endpoint) -> None:
        """Wait until other processes leave the CPUs nearly idle: per cell and per run, bounded."""
        started = time.monotonic()
        budget = min(self.s.quiet_wait, self.quiet_budget)
        cpu.wait_quiet(endpoint.pids, [self.mock_pid], budget, report.NOISY_OTHER_CPU_PCT)
        self.quiet_budget = max(0.0, self.quiet_budget - (time.monotonic() - started))

    def _wrk(self, endpoint: targets.Endpoint, script: Path, n: int, seconds: float) -> loadgen.WrkResult:
        return loadgen.run_wrk(endpoint.url, script, connections=n, seconds=seconds, cpu=self.layout.load_cpu)

    def _cell(self, name: str, mode: str, n: int, endpoint: targets.Endpoint, script: Path) -> report.Cell:
        """wrk for the duration, then (streams) the TTFB probe, inside one CPU accounting window."""
        calibration = cpu.speed_ms(self.layout.gateway_cpu)
        with cpu.Window(endpoint.pids, [self.mock_pid]) as window:
            result = self._wrk(endpoint, script, n, self.s.duration)
            cell = report.Cell(
                target=name,
                mode=mode,
                concurrency=n,
                rps=result.rps,
                p50_ms=result.p50_ms,
                p99_ms=result.p99_ms,
                requests=result.requests,
                errors=result.errors,
                gateway_cpu_us=None,
                other_cpu_pct=0.0,
            )
            if mode == "stream":
                self._ttfb(cell, endpoint)
        served = cell.requests + cell.ttfb_requests + cell.ttfb_errors
        if endpoint.pids and served:
            cell.gateway_cpu_us = window.gateway_us(served)
        cell.other_cpu_pct = window.other_pct
        cell.calibration_ms = (calibration, cpu.speed_ms(self.layout.gateway_cpu))
        return cell

    def _ttfb(self, cell: report.Cell, endpoint: targets.Endpoint) -> None:
        got = probe.run_async(
            probe.ttfb_run(
                endpoint.url,
                request_body(endpoint.model, True),
                endpoint.headers,
                concurrency=cell.concurrency,
                max_requests=self.s.ttfb_requests,
                seconds=self.s.ttfb_seconds,
                accept=lambda a: check_answer("stream", a),
            )
        )
        assert isinstance(got, probe.TtfbResult)
        cell.ttfb_p50_ms = probe.percentile(got.ttfb_ms, 50) if got.ttfb_ms else None
        cell.ttfb_p99_ms = probe.percentile(got.ttfb_ms, 99) if got.ttfb_ms else None
        cell.ttfb_requests = got.requests
        cell.ttfb_errors = got.errors
        cell.ttfb_first_error = got.first_error[:300]


# --- the run -------------------------------------------------------------------------------------


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {model}, {platform.system()} {platform.release()}"


def _wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    first = (done.stdout or done.stderr).strip().splitlines()
    return " ".join(first[0].split()[:2]) if first else "wrk"


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(settings: Settings) -> report.Report:
    layout = Layout.choose(settings.pin)
    if layout.load_cpu is not None:
        os.sched_setaffinity(0, {layout.load_cpu})  # the orchestrator and the probe stay off the gateway's CPU
    logs = settings.results / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    install_log = logs / "install.log"
    loadgen_path = install.ensure_wrk(install_log)
    work = Path(tempfile.mkdtemp(prefix="idgate-bench-"))
    say(f"wrk: {loadgen_path}; scratch: {work}; logs: {logs}")
    result = report.Report(
        meta={
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(),
            "python": platform.python_version(),
            "wrk": _wrk_version(),
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "ttfb_requests_max": settings.ttfb_requests,
            "ttfb_seconds_max": settings.ttfb_seconds,
            "pinning": layout.describe(),
            "loadavg_before": "/".join(f"{x:.2f}" for x in cpu.loadavg()),
            "loadavg_after": "",
        }
    )
    try:
        with procs.Processes(logs) as processes:
            mock = processes.start(
                "mock-upstream",
                [sys.executable, str(BENCH_DIR / "mock_upstream.py"), "--port", str(port := procs.free_port())],
                cpu=layout.load_cpu,
            )
            upstream = f"http://127.0.0.1:{port}"
            procs.wait_http(mock, f"{upstream}/health", timeout=30)
            ctx = targets.Context(processes, work, upstream, layout.gateway_cpu, install_log)
            bench = Bench(settings, layout, work, mock.pid)
            chosen = targets.make(settings.targets, settings.litellm_venv, settings.idgate)
            prepared = []
            for target in chosen:
                try:
                    target.prepare(ctx)
                    prepared.append(target)
                except targets.Unavailable as exc:
                    say(f"[{target.name}] skipped: {exc}")
                    result.targets.append(report.TargetStatus(target.name, False, str(exc)))
            for target in prepared:
                status = _measure_one(target, ctx, bench, result)
                result.targets.append(status)
    except KeyboardInterrupt:
        result.meta["interrupted"] = True
    finally:
        result.meta["loadavg_after"] = "/".join(f"{x:.2f}" for x in cpu.loadavg())
        if not settings.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    order = {name: i for i, name in enumerate(targets.NAMES)}
    result.targets.sort(key=lambda t: order.get(t.name, 99))
    return result


def _measure_one(
    target: targets.Target, ctx: targets.Context, bench: Bench, into: report.Report
) -> report.TargetStatus:
    say(f"[{target.name}] starting")
    try:
        with target.serve(ctx) as endpoint:
            smoke(endpoint, bench.s.modes)
            bench.measure(target.name, endpoint, into)
    except (targets.Unavailable, loadgen.WrkError) as exc:
        done = sum(1 for c in into.cells if c.target == target.name)
        reason = f"stopped after {done} cells: {exc}" if done else str(exc)
        say(f"[{target.name}] skipped: {reason}")
        return report.TargetStatus(target.name, False, reason)
    return report.TargetStatus(target.name, True, target.version)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    try:
        result = run(settings)
    except install.InstallError as exc:
        say(f"cannot run the benchmark: {exc}")
        return 2
    print(report.to_markdown(result))
    if result.meta.get("interrupted"):
        say("interrupted: partial results above, nothing written")
        return 130
    if not result.cells:
        say("nothing was measured, nothing written")
        return 1
    json_path, md_path = report.write(result, settings.results)
    say(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
