"""Results of a run: the cells, the comparisons, the goals, and their rendering.

One `Cell` per target x mode x concurrency. From the cells come the added
median latency over `direct` at concurrency 1, the throughput ratios between
gateways, and the checks against idgate's goals. The same `Report` is written
as JSON (everything) and as a markdown table (for the README and the terminal).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPEED_SPREAD = 0.15  # calibration times further apart than this: the machine changed speed
NOISY_OTHER_CPU_PCT = 5.0  # other processes' CPU, in % of one core, that marks a cell noisy
ERROR_SHARE = 0.01  # a cell with more failed requests than this is marked

GOAL_FLOOR_SHARE = 0.70  # idgate throughput >= 70 % of the floor's
GOAL_LITELLM_TIMES = 30.0  # idgate throughput >= 30 x LiteLLM's
GOAL_ADDED_P50_MS = 0.5  # idgate p50 at concurrency 1 <= direct's + 0.5 ms


@dataclass
class Cell:
    target: str
    mode: str  # "chat" (JSON answer) or "stream" (SSE)
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    gateway_cpu_us: float | None  # gateway CPU per request, None without a gateway
    other_cpu_pct: float  # CPU of processes outside the benchmark, % of one core
    ttfb_p50_ms: float | None = None
    ttfb_p99_ms: float | None = None
    ttfb_requests: int = 0
    ttfb_errors: int = 0
    ttfb_first_error: str = ""
    calibration_ms: tuple[float, float] = (0.0, 0.0)  # cpu.speed_ms on the gateway's CPU before and after

    @property
    def noisy(self) -> bool:
        return self.other_cpu_pct > NOISY_OTHER_CPU_PCT

    @property
    def failing(self) -> bool:
        return self.errors > ERROR_SHARE * max(self.requests, 1) or self.ttfb_errors > 0


@dataclass
class TargetStatus:
    name: str
    measured: bool
    detail: str  # version when measured, the reason otherwise

    def __post_init__(self) -> None:
        self.detail = " ".join(self.detail.split())  # one line, for the table and the logs


@dataclass
class Check:
    goal: str
    value: str
    met: bool | None  # None: could not be evaluated


@dataclass
class Report:
    meta: dict[str, Any]
    targets: list[TargetStatus] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)

    def cell(self, target: str, mode: str, concurrency: int) -> Cell | None:
        for c in self.cells:
            if (c.target, c.mode, c.concurrency) == (target, mode, concurrency):
                return c
        return None

    def modes(self) -> list[str]:
        return list(dict.fromkeys(c.mode for c in self.cells))

    def concurrencies(self) -> list[int]:
        return sorted({c.concurrency for c in self.cells})

    def added_p50_ms(self, target: str, mode: str) -> float | None:
        """Median latency `target` adds over `direct` at concurrency 1."""
        mine, direct = self.cell(target, mode, 1), self.cell("direct", mode, 1)
        if mine is None or direct is None or target == "direct":
            return None
        return mine.p50_ms - direct.p50_ms

    def ratio(self, a: str, b: str, mode: str, concurrency: int) -> float | None:
        """Throughput of `a` over `b`."""
        ca, cb = self.cell(a, mode, concurrency), self.cell(b, mode, concurrency)
        if ca is None or cb is None or cb.rps <= 0:
            return None
        return ca.rps / cb.rps

    def checks(self) -> list[Check]:
        """idgate's goals, evaluated at the highest concurrency for throughput."""
        top = max(self.concurrencies(), default=0)
        found: list[Check] = []
        for mode in self.modes():
            share = self.ratio("idgate", "floor", mode, top)
            found.append(
                Check(
                    f"idgate {mode} throughput >= {GOAL_FLOOR_SHARE:.0%} of floor (c{top})",
                    "n/a" if share is None else f"{share:.0%}",
                    None if share is None else share >= GOAL_FLOOR_SHARE,
                )
            )
            times = self.ratio("idgate", "litellm", mode, top)
            found.append(
                Check(
                    f"idgate {mode} throughput >= {GOAL_LITELLM_TIMES:.0f}x LiteLLM (c{top})",
                    "n/a" if times is None else f"{times:.1f}x",
                    None if times is None else times >= GOAL_LITELLM_TIMES,
                )
            )
            added = self.added_p50_ms("idgate", mode)
            found.append(
                Check(
                    f"idgate {mode} added p50 over direct at c1 <= {GOAL_ADDED_P50_MS} ms",
                    "n/a" if added is None else f"{added:.3f} ms",
                    None if added is None else added <= GOAL_ADDED_P50_MS,
                )
            )
        return found

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "meta": self.meta,
            "targets": [asdict(t) for t in self.targets],
            "cells": [{**asdict(c), "noisy": c.noisy, "failing": c.failing} for c in self.cells],
            "added_p50_ms_at_c1": {
                t.name: {m: self.added_p50_ms(t.name, m) for m in self.modes()}
                for t in self.targets
                if t.measured and t.name != "direct"
            },
            "ratios": [
                {"mode": m, "concurrency": n, **{f"{a}/{b}": self.ratio(a, b, m, n) for a, b in _RATIOS}}
                for m in self.modes()
                for n in self.concurrencies()
            ],
            "checks": [asdict(c) for c in self.checks()],
        }
        return data


_RATIOS = (("idgate", "floor"), ("idgate", "litellm"), ("floor", "litellm"))


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]], labels: int) -> list[str]:
    """A markdown table padded to line up in a terminal too; after `labels` columns, numbers (right-aligned)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = [i >= labels for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True))
        + "|"
    )
    return [line(header), rule, *(line(r) for r in rows)]


def _cells_table(report: Report) -> list[str]:
    header = [
        "target",
        "mode",
        "conc",
        "req/s",
        "p50 ms",
        "p99 ms",
        "TTFB p50 ms",
        "TTFB p99 ms",
        "+p50 vs direct ms",
        "gw CPU µs/req",
        "errors",
        "other CPU %",
    ]
    rows = []
    for c in report.cells:
        added = report.added_p50_ms(c.target, c.mode) if c.concurrency == 1 else None
        marks = (" ⚠" if c.failing else "") + (" (noisy)" if c.noisy else "")
        errors = f"{c.errors}" + (f"+{c.ttfb_errors}" if c.ttfb_errors else "")
        rows.append(
            [
                c.target,
                c.mode,
                str(c.concurrency),
                _num(c.rps, 0),
                _num(c.p50_ms),
                _num(c.p99_ms),
                _num(c.ttfb_p50_ms),
                _num(c.ttfb_p99_ms),
                _num(added, 3),
                _num(c.gateway_cpu_us, 0),
                errors + marks,
                _num(c.other_cpu_pct, 1),
            ]
        )
    return _table(header, rows, labels=2)


def _ratio_table(report: Report) -> list[str]:
    header = ["mode", "conc", *(f"{a}/{b}" for a, b in _RATIOS)]
    rows = []
    for mode in report.modes():
        for n in report.concurrencies():
            values = [report.ratio(a, b, mode, n) for a, b in _RATIOS]
            if any(v is not None for v in values):
                rows.append([mode, str(n), *("" if v is None else f"{v:.2f}" for v in values)])
    return _table(header, rows, labels=2) if rows else ["(no two gateways measured)"]


def to_markdown(report: Report) -> str:
    meta = report.meta
    out = [f"### idgate benchmark, {meta['started']}", ""]
    out.append(
        f"{meta['machine']}; Python {meta['python']}; {meta['wrk']}; {meta['duration_s']:g} s per "
        f"cell after {meta['warmup_s']:g} s warm-up; {meta['pinning']}."
    )
    out.append("")
    out += _cells_table(report)
    out += ["", "Throughput ratios (req/s of one over the other):", ""]
    out += _ratio_table(report)
    out += ["", "Goals:", ""]
    for check in report.checks():
        mark = {True: "met", False: "NOT met", None: "not evaluated"}[check.met]
        out.append(f"- {check.goal}: {check.value} ({mark})")
    out += ["", "Targets:", ""]
    for t in report.targets:
        status = ("measured" + (f", version {t.detail}" if t.detail else "")) if t.measured else f"skipped: {t.detail}"
        out.append(f"- {t.name}: {status}")
    noisy = [f"{c.target}/{c.mode}/c{c.concurrency}" for c in report.cells if c.noisy]
    out += [
        "",
        (
            f"CPU contention: loadavg {meta['loadavg_before']} before, {meta['loadavg_after']} after; "
            + (
                f"noisy cells (other processes > {NOISY_OTHER_CPU_PCT:g} % of a core): "
                + ", ".join(noisy)
                + " - rerun before trusting them."
                if noisy
                else f"no cell saw other processes above {NOISY_OTHER_CPU_PCT:g} % of a core."
            )
        ),
    ]
    out += ["", _speed_line(report)]
    if meta.get("interrupted"):
        out += ["", "**Interrupted: partial results.**"]
    return "\n".join(out) + "\n"


def _speed_line(report: Report) -> str:
    times = [t for c in report.cells for t in c.calibration_ms if t > 0]
    if not times:
        return "CPU speed: not calibrated."
    low, high = min(times), max(times)
    spread = high / low - 1
    line = (
        f"CPU speed: a fixed Python loop on the gateway's CPU took {low:.1f} to {high:.1f} ms "
        f"before and after the cells (spread {spread:.0%})"
    )
    if spread > SPEED_SPREAD:
        return line + ": the machine's speed changed during the run (shared host?), so compare with care."
    return line + "."


def write(report: Report, folder: Path, stem: str = "latest") -> tuple[Path, Path]:
    """Write STEM.json and STEM.md into `folder` atomically; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / f"{stem}.json", folder / f"{stem}.md")
    texts = (json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n", to_markdown(report))
    for path, text in zip(paths, texts, strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths
