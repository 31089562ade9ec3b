"""The policy store: validated policies and entities, swapped atomically on reload.

A `PolicyStore` reads the policy files and entity files it is given, validates
them against the shipped schema and compiles them into one immutable
`PolicySnapshot`. Decisions read `store.snapshot` once per call, so a reload
that swaps it is atomic: a call sees the old set or the new one, never a mix.
A reload that fails keeps the old snapshot and says why. `PolicyWatcher` polls
the files' mtimes from an asyncio task and reloads when they change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cedarpy

from idgate.errors import ConfigError
from idgate.policy.data_classes import DataClasses
from idgate.policy.entities import EntityData, load_entity_data
from idgate.policy.graph import EntityGraph
from idgate.policy.policies import PolicyBundle, PolicyError, PolicyProblem, compile_policies

__all__ = ["SCHEMA_PATH", "PolicySnapshot", "PolicyStore", "PolicyWatcher", "ReloadOutcome", "load_policies"]

SCHEMA_PATH = Path(__file__).parent / "schema.cedarschema"
log = logging.getLogger("idgate.policy")


@dataclass(frozen=True)
class PolicySnapshot:
    """Everything one decision needs, immutable: policies, entity graph, schema, revision."""

    policies: PolicyBundle
    graph: EntityGraph
    schema: cedarpy.Schema
    classes: DataClasses
    revision: str


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What a reload did: swapped in `revision`, found nothing changed, or failed (and kept the old set)."""

    changed: bool
    revision: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise PolicyError([PolicyProblem(str(path), 0, f"cannot be read: {exc.strerror}")]) from None


class PolicyStore:
    """Policies from `policy_files` and entities from `entities` + `entity_files`, validated.

    Construction raises `PolicyError` (a `ConfigError`) naming file, line and
    Cedar's message for each policy that does not parse or validate, and
    `ConfigError` for bad entity data.
    """

    def __init__(
        self,
        policy_files: Sequence[str | os.PathLike[str]],
        *,
        entities: EntityData | None = None,
        entity_files: Sequence[str | os.PathLike[str]] = (),
        classes: DataClasses | None = None,
    ) -> None:
        if not policy_files:
            raise ConfigError(["policy: no policy files are configured"])
        self._policy_files = tuple(Path(p) for p in policy_files)
        self._entity_files = tuple(Path(p) for p in entity_files)
        self._entities = entities or EntityData()
        self._classes = classes or DataClasses()
        self._schema_text = SCHEMA_PATH.read_text()
        self._schema = cedarpy.Schema.from_str(self._schema_text)
        self._lock = threading.Lock()
        self._snapshot = self._build(self._entities)

    @property
    def snapshot(self) -> PolicySnapshot:
        """The current snapshot; read it once per decision."""
        return self._snapshot

    @property
    def revision(self) -> str:
        """A hash of the schema, policy texts, entity data and data classes in force."""
        return self._snapshot.revision

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the store reads (policies, then entities)."""
        return self._policy_files + self._entity_files

    def _build(self, entities: EntityData) -> PolicySnapshot:
        sources = [(str(path), _read(path)) for path in self._policy_files]
        data = entities.merge(*(load_entity_data(path) for path in self._entity_files))
        data.check_references()
        try:
            graph = EntityGraph(data, self._classes)
        except ValueError as exc:  # a model's unknown data class, a membership cycle
            raise ConfigError([f"entity data: {exc}"]) from None
        bundle = compile_policies(sources, self._schema)
        digest = hashlib.sha256()
        for part in (self._schema_text, *(f"{n}\0{t}" for n, t in sources), data.model_dump_json(), *self._classes):
            digest.update(part.encode())
            digest.update(b"\0")
        return PolicySnapshot(bundle, graph, self._schema, self._classes, "pol_" + digest.hexdigest()[:20])

    def reload(self, entities: EntityData | None = None) -> ReloadOutcome:
        """Re-read the files (and take `entities`, when given); swap only if all of it validates."""
        with self._lock:
            old = self._snapshot
            try:
                new = self._build(self._entities if entities is None else entities)
            except ConfigError as exc:
                problems = tuple(exc.problems)
            except Exception as exc:  # noqa: BLE001 - INVARIANT: a failed reload keeps the old set
                problems = (f"{type(exc).__name__}: {exc}",)
            else:
                problems = ()
            if problems:
                log.warning("policy reload refused, keeping revision %s: %s", old.revision, "; ".join(problems))
                return ReloadOutcome(False, old.revision, problems)
            if entities is not None:
                self._entities = entities
            if new.revision == old.revision:
                return ReloadOutcome(False, old.revision)
            # INVARIANT: one attribute store; decisions read the snapshot once, so they see old or new.
            self._snapshot = new
            log.info("policy revision %s in force (was %s)", new.revision, old.revision)
            return ReloadOutcome(True, new.revision)


def load_policies(
    files: Sequence[str | os.PathLike[str]],
    entities: EntityData | None = None,
    *,
    entity_files: Sequence[str | os.PathLike[str]] = (),
    classes: DataClasses | None = None,
) -> PolicyStore:
    """Load and validate policies and entities; see `PolicyStore`."""
    return PolicyStore(files, entities=entities, entity_files=entity_files, classes=classes)


FileState = tuple[tuple[int, int, int] | None, ...]


class PolicyWatcher:
    """Reloads `store` when one of its files changes (mtime, size or inode).

    `check()` is the synchronous step; `run()` polls every `interval` seconds
    until cancelled, reloading in a worker thread so the event loop keeps serving.
    """

    def __init__(
        self,
        store: PolicyStore,
        interval: float = 1.0,
        on_reload: Callable[[ReloadOutcome], None] | None = None,
    ) -> None:
        self.store = store
        self.interval = interval
        self._on_reload = on_reload
        self._state = self._stat()

    def _stat(self) -> FileState:
        states: list[tuple[int, int, int] | None] = []
        for path in self.store.files:
            try:
                st = path.stat()
                states.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                states.append(None)
        return tuple(states)

    def changed(self) -> bool:
        """Whether a file differs from when it was last looked at."""
        return self._stat() != self._state

    def _reload(self) -> ReloadOutcome:
        # Remember the state read before reloading, so an edit during the reload is seen next time.
        self._state = self._stat()
        outcome = self.store.reload()
        if self._on_reload is not None:
            try:
                self._on_reload(outcome)
            except Exception:  # a faulty listener must not stop the watching
                log.exception("policy reload listener failed")
        return outcome

    def check(self) -> ReloadOutcome | None:
        """Reload if a file changed; the outcome, or None when nothing changed."""
        return self._reload() if self.changed() else None

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            if self.changed():
                await asyncio.to_thread(self._reload)
