"""Tasks: the unit of work a short-lived credential is bound to.

A caller starts a task (`POST /tasks`) with a purpose, a scope ceiling and a
lifetime (capped by `tasks.max_lifetime_seconds`). The task belongs to the
caller: it acts for the caller's subject, and records the agents that started
it. Tokens are bound to it by token exchange with the `task` parameter: only
for the task's subject, within its scope, never beyond its expiry. When the
task is completed (`POST /tasks/{id}/complete`: by its subject, by an agent of
the chain that started it, or by an administrator) or expires, every token
bound to it, and every token exchanged from those, is refused
(`idgate.sts.revocation`).

Who may see a task (`GET /tasks/{id}`) is who may complete it; anyone else gets
404, as if it did not exist.

Every such check compares identities as (issuer, id): the task's subject, the
agents that started it (each stored with the issuer that vouched for it), and the
administrators, configured issuer-qualified (`Allowed`). An id alone means
nothing: another trusted issuer may have a subject of the same name.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

import orjson

from idgate.identity.allowed import Allowed
from idgate.identity.principal import Caller
from idgate.store.base import StateStore, Task
from idgate.sts.lifecycle_settings import TasksSettings
from idgate.sts.revocation import Liveness

__all__ = ["Tasks", "caller_label", "owner_actors"]


def owner_actors(task: Task) -> list[tuple[str | None, str]]:
    """The agents that started `task`, as (issuer, id); an entry of an older version has no issuer."""
    actors: list[tuple[str | None, str]] = []
    for entry in task.owner_actors:
        value = orjson.loads(entry) if entry.startswith("[") else None
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            actors.append((value[0], value[1]))
        else:
            actors.append((None, entry))
    return actors


def caller_label(caller: Caller) -> str:
    """Who did something, for the store's `by` columns: the subject and the acting agent, never a token."""
    label = f"{caller.subject.kind}:{caller.subject.id}"
    if caller.acting_agent is not None:
        label += f" via {caller.acting_agent.id}"
    return label


class Tasks:
    """Starting, reading and completing tasks in the state store."""

    def __init__(
        self,
        store: StateStore,
        liveness: Liveness,
        settings: TasksSettings,
        admins: Allowed,
        *,
        retention_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.liveness = liveness
        self.settings = settings
        self._admins = admins
        self._retention = retention_seconds
        self._clock = clock

    def is_admin(self, caller: Caller) -> bool:
        # An administrator acts in person: a token used by an agent for an administrator is not one.
        if caller.actors:
            return False
        return self._admins.admits(caller.subject)

    def lifetime(self, asked: int | None) -> int:
        lifetime = self.settings.default_lifetime_seconds if asked is None else asked
        return min(lifetime, self.settings.max_lifetime_seconds)

    async def start(self, caller: Caller, purpose: str, scope: tuple[str, ...] | None, lifetime: int | None) -> Task:
        now = self._clock()
        task = Task(
            id="task_" + secrets.token_urlsafe(18),
            subject=caller.subject.id,
            subject_issuer=caller.subject.issuer,
            # Each agent with its issuer (an `act` entry without `iss` is of the token's issuer).
            owner_actors=tuple(orjson.dumps([a.issuer or caller.subject.issuer, a.id]).decode() for a in caller.actors),
            tenant=caller.subject.tenant,
            purpose=purpose,
            scope=scope,
            created_at=now,
            expires_at=now + self.lifetime(lifetime),
        )
        await asyncio.to_thread(self.store.create_task, task)
        return task

    async def get(self, task_id: str) -> Task | None:
        return await asyncio.to_thread(self.store.get_task, task_id)

    def may_manage(self, caller: Caller, task: Task) -> bool:
        """The task's subject (itself or through agents), an agent that started it, or an administrator."""
        if self.is_admin(caller):
            return True
        subject = caller.subject
        if subject.id == task.subject and subject.issuer == task.subject_issuer:
            return True
        if subject.tenant != task.tenant:
            return False
        return (subject.issuer, subject.id) in owner_actors(task)

    def may_bind(self, caller: Caller, task: Task) -> bool:
        """Whether a token of `caller` (the exchange's subject) may be bound to `task`: it must act for its subject."""
        subject = caller.subject
        return subject.id == task.subject and subject.issuer == task.subject_issuer and subject.tenant == task.tenant

    async def complete(self, task: Task, caller: Caller) -> Task:
        """End the task (idempotent): its tokens die here at once, elsewhere within one poll."""
        now = self._clock()
        until = max(task.expires_at, now) + self._retention
        done = await asyncio.to_thread(self.store.complete_task, task.id, caller_label(caller), now, until)
        ended = done or task
        self.liveness.task_ended(task.id, until)
        return ended

    def status(self, task: Task) -> str:
        return task.status(self._clock())
