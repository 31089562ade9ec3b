"""Tool-call budgets: how many calls (and write calls) a task or an agent may make.

A runaway agent loops: the same tool, again and again, each call allowed on its
own. Budgets stop it: per task (the caller's credential `task`) and per acting
agent (per window of `agent_window_seconds`), a number of tool calls and a
number of non-read calls. A call is counted when it is allowed and about to go
upstream; the first call past a limit is refused.

The counters are in the state store (`idgate.store`, `count_up`): one count
shared by every worker and replica, added to atomically, so a limit holds for
the whole gateway and a restart does not reset it. Keys name the issuer with
the task or agent (`bob` of one issuer is not `bob` of another). A window's
counters are forgotten when it ends; a task's, `TASK_KEPT_SECONDS` after its
last call. A store that cannot answer refuses the call (503): budgets fail closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

from idgate.identity.principal import Caller
from idgate.mcp.settings import McpBudgets
from idgate.store.base import Counter, StateStore

__all__ = ["TASK_KEPT_SECONDS", "BudgetExceeded", "Budgets"]

TASK_KEPT_SECONDS = 7 * 86400  # a task's counts are kept this long after its last call


class BudgetExceeded(Exception):
    """A call past a budget; `limit` names which ("task_calls", "agent_writes", ...)."""

    def __init__(self, limit: str, allowed: int, subject: str) -> None:
        super().__init__(f"the {limit.replace('_', ' ')} budget of {allowed} for {subject} is used up")
        self.limit = limit
        self.allowed = allowed


def _key(*parts: str) -> str:
    """A counter key: `mcp-budget:` and a digest of its parts (ids and issuers may hold any character)."""
    return "mcp-budget:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


class Budgets:
    def __init__(self, settings: McpBudgets, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock

    @property
    def enabled(self) -> bool:
        s = self._settings
        return any(v is not None for v in (s.task_calls, s.task_writes, s.agent_calls, s.agent_writes))

    async def spend(self, caller: Caller, write: bool) -> dict[str, int]:
        """Count one call, or raise `BudgetExceeded` (counting nothing); the counts after it.

        Raises `StoreUnavailable` when the store cannot answer (the call is then refused)."""
        checks = self._checks(caller, write)
        if not checks:
            return {}
        counters = [counter for _, counter, _ in checks]
        added, counts = await asyncio.to_thread(self._store.count_up, counters, self._clock())
        if not added:
            for (limit, counter, who), count in zip(checks, counts, strict=True):
                if count >= counter.limit:
                    raise BudgetExceeded(limit, counter.limit, who)
        return {limit: count for (limit, _, _), count in zip(checks, counts, strict=True)}

    def _checks(self, caller: Caller, write: bool) -> list[tuple[str, Counter, str]]:
        s = self._settings
        now = self._clock()
        checks: list[tuple[str, Counter, str]] = []
        task = caller.credential.task
        if task is not None:
            # A task id is the token service's (or its issuer's): qualified by the credential's issuer.
            issuer = caller.credential.issuer_name
            until = now + TASK_KEPT_SECONDS
            if s.task_calls is not None:
                checks.append(
                    ("task_calls", Counter(_key("task", issuer, task, "calls"), s.task_calls, until), f"task `{task}`")
                )
            if write and s.task_writes is not None:
                checks.append(
                    (
                        "task_writes",
                        Counter(_key("task", issuer, task, "writes"), s.task_writes, until),
                        f"task `{task}`",
                    )
                )
        agent = caller.acting_agent
        if agent is not None:
            agent_id, agent_issuer = agent.id, agent.issuer or caller.subject.issuer
        elif caller.subject.kind == "agent":
            agent_id, agent_issuer = caller.subject.id, caller.subject.issuer
        else:
            return checks
        window = int(now // s.agent_window_seconds)
        until = (window + 1) * s.agent_window_seconds  # the window's end: its counts are forgotten then
        who = f"agent `{agent_id}`"
        if s.agent_calls is not None:
            key = _key("agent", agent_issuer, agent_id, str(window), "calls")
            checks.append(("agent_calls", Counter(key, s.agent_calls, until), who))
        if write and s.agent_writes is not None:
            key = _key("agent", agent_issuer, agent_id, str(window), "writes")
            checks.append(("agent_writes", Counter(key, s.agent_writes, until), who))
        return checks
