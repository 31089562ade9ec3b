"""Tool-call budgets: how many calls (and write calls) a task or an agent may make.

A runaway agent loops: the same tool, again and again, each call allowed on its
own. Budgets stop it: per task (the caller's credential `task`) and per acting
agent (per window of `agent_window_seconds`), a number of tool calls and a
number of non-read calls. A call is counted when it is allowed and about to go
upstream; the first call past a limit is refused.

Counters live in this process (one worker). Across workers or replicas each
process counts on its own, so a limit holds per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from idgate.identity.principal import Caller
from idgate.mcp.settings import McpBudgets

__all__ = ["BudgetExceeded", "Budgets"]

_MAX_KEYS = 100_000  # counters kept before the oldest are forgotten


class BudgetExceeded(Exception):
    """A call past a budget; `limit` names which ("task_calls", "agent_writes", ...)."""

    def __init__(self, limit: str, allowed: int, subject: str) -> None:
        super().__init__(f"the {limit.replace('_', ' ')} budget of {allowed} for {subject} is used up")
        self.limit = limit
        self.allowed = allowed


class Budgets:
    def __init__(self, settings: McpBudgets, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._counts: dict[tuple[str, ...], int] = {}

    @property
    def enabled(self) -> bool:
        s = self._settings
        return any(v is not None for v in (s.task_calls, s.task_writes, s.agent_calls, s.agent_writes))

    def spend(self, caller: Caller, write: bool) -> dict[str, int]:
        """Count one call, or raise `BudgetExceeded` (counting nothing); the counts after it."""
        s = self._settings
        checks: list[tuple[str, tuple[str, ...], int, str]] = []
        task = caller.credential.task
        if task is not None:
            if s.task_calls is not None:
                checks.append(("task_calls", ("task", task, "calls"), s.task_calls, f"task `{task}`"))
            if write and s.task_writes is not None:
                checks.append(("task_writes", ("task", task, "writes"), s.task_writes, f"task `{task}`"))
        agent = caller.acting_agent
        if agent is None and caller.subject.kind == "agent":
            agent_id: str | None = caller.subject.id
        else:
            agent_id = agent.id if agent is not None else None
        if agent_id is not None:
            window = str(int(self._clock() // s.agent_window_seconds))
            if s.agent_calls is not None:
                checks.append(
                    ("agent_calls", ("agent", agent_id, window, "calls"), s.agent_calls, f"agent `{agent_id}`")
                )
            if write and s.agent_writes is not None:
                checks.append(
                    ("agent_writes", ("agent", agent_id, window, "writes"), s.agent_writes, f"agent `{agent_id}`")
                )
        for limit, key, allowed, who in checks:
            if self._counts.get(key, 0) >= allowed:
                raise BudgetExceeded(limit, allowed, who)
        spent: dict[str, int] = {}
        for limit, key, _, _ in checks:
            self._counts[key] = spent[limit] = self._counts.get(key, 0) + 1
        if len(self._counts) > _MAX_KEYS:
            for old in list(self._counts)[: _MAX_KEYS // 10]:
                del self._counts[old]
        return spent
