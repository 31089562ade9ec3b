"""CPU accounting from /proc, to tell what a cell cost and whether it was noisy.

`speed_ms` times a fixed pure-Python loop on a given CPU: on a shared host the
machine itself can get slower (other tenants, frequency), which no process
list shows; a spread of these times over a run says so.

A `Snapshot` holds the machine's busy CPU time and the CPU time of the
processes we know (the gateway under test with its children, the mock
upstream, this process, and the load generators it has reaped). Between two
snapshots, what the machine spent beyond our own processes is "other" CPU:
a cell where other processes used noticeable CPU should be discarded.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TICK = float(os.sysconf("SC_CLK_TCK"))
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is index 0)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """User + system CPU seconds of the processes `roots` and all their descendants."""
    children = _children_map()
    total = 0
    todo = list(roots)
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
        todo.extend(children.get(pid, ()))
    return total / _TICK


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot."""
    with (_PROC / "stat").open() as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = (_PROC / "loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def _own_seconds() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, reaped.ru_utime + reaped.ru_stime


@dataclass(frozen=True)
class Snapshot:
    busy: float
    gateway: float
    helpers: float
    me: float
    reaped: float

    @classmethod
    def take(cls, gateway_pids: Iterable[int], helper_pids: Iterable[int]) -> Snapshot:
        me, reaped = _own_seconds()
        return cls(
            busy=busy_cpu_seconds(),
            gateway=tree_cpu_seconds(gateway_pids),
            helpers=tree_cpu_seconds(helper_pids),
            me=me,
            reaped=reaped,
        )


@dataclass(frozen=True)
class Usage:
    """CPU seconds used between two snapshots."""

    gateway: float
    load: float  # load generator, mock upstream and this process
    other: float  # everything else on the machine

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> Usage:
        gateway = after.gateway - before.gateway
        load = (after.helpers - before.helpers) + (after.me - before.me)
        load += after.reaped - before.reaped
        other = (after.busy - before.busy) - gateway - load
        return cls(gateway=gateway, load=load, other=max(other, 0.0))


def other_share(gateway_pids: Iterable[int], helper_pids: Iterable[int], window: float) -> float:
    """Cores' worth of CPU that processes outside the benchmark use, sampled over `window` s."""
    gateway, helpers = list(gateway_pids), list(helper_pids)
    before = Snapshot.take(gateway, helpers)
    time.sleep(window)
    return Usage.between(before, Snapshot.take(gateway, helpers)).other / window


def wait_quiet(gateway_pids: Iterable[int], helper_pids: Iterable[int], budget: float, limit_pct: float) -> None:
    """Wait, at most `budget` s, until processes outside the benchmark use at most `limit_pct` % of a core."""
    gateway, helpers = list(gateway_pids), list(helper_pids)
    deadline = time.monotonic() + budget
    while other_share(gateway, helpers, window=0.5) * 100 > limit_pct and time.monotonic() < deadline:
        pass


class Window:
    """The CPU used while a `with` block runs (one accounting window for a cell): `used` and `wall`, set on exit."""

    def __init__(self, gateway_pids: Iterable[int], helper_pids: Iterable[int]) -> None:
        self._gateway, self._helpers = list(gateway_pids), list(helper_pids)
        self.used = Usage(0.0, 0.0, 0.0)
        self.wall = 0.0

    def __enter__(self) -> Window:
        self._before = Snapshot.take(self._gateway, self._helpers)
        self._started = time.monotonic()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.monotonic() - self._started
        self.used = Usage.between(self._before, Snapshot.take(self._gateway, self._helpers))

    @property
    def other_pct(self) -> float:
        """CPU of processes outside the benchmark, in % of one core."""
        return self.used.other / self.wall * 100 if self.wall > 0 else 0.0

    def gateway_us(self, requests: int) -> float:
        """Gateway CPU per request, in µs."""
        return self.used.gateway / max(requests, 1) * 1e6


def _spin() -> float:
    started = time.perf_counter()
    total = 0
    for i in range(200_000):
        total += i * i % 7
    return (time.perf_counter() - started) * 1e3


def speed_ms(cpu: int | None, rounds: int = 5) -> float:
    """Best time in ms of a fixed Python loop on `cpu` (higher: the machine is slower now)."""
    before = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        return min(_spin() for _ in range(rounds))
    finally:
        os.sched_setaffinity(0, before)
