"""Atomic reload: a good edit swaps in, a bad one keeps the old set and says why."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from idgate.policy import CedarAuthorizer, EntityData, PolicyStore, PolicyWatcher, ReloadOutcome, Resource
from tests.policy.conftest import caller

ENTITIES: dict[str, Any] = {
    "models": [{"name": "m", "provider": "p", "location": "internal", "max_data_class": "internal"}],
    "entitlements": [{"tenant": "*", "models": ["m"]}],
}
ALLOW = '@id("entitled")\npermit (principal, action, resource) when { principal in resource.entitlements };\n'
DENY = ALLOW + '@id("closed") @reason("scope")\nforbid (principal, action, resource);\n'
INVALID = ALLOW + "forbid (principal, action, resource) when { context.nonsense };\n"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.cedar"
    path.write_text(ALLOW)
    return path


@pytest.fixture
def store(policy_file: Path) -> PolicyStore:
    return PolicyStore([policy_file], entities=EntityData.model_validate(ENTITIES))


def allowed(store: PolicyStore) -> bool:
    return CedarAuthorizer(store).authorize(caller(), "invoke_model", Resource("model", "m"), {}).allowed


def touch(path: Path, text: str) -> None:
    """Write `text` and move the mtime on, so a poll sees the change even within one clock tick."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_a_good_reload_swaps_in_a_new_revision(store: PolicyStore, policy_file: Path) -> None:
    old = store.revision
    assert allowed(store)
    policy_file.write_text(DENY)
    outcome = store.reload()
    assert outcome == ReloadOutcome(True, store.revision)
    assert store.revision != old
    assert not allowed(store)


def test_a_reload_without_changes_changes_nothing(store: PolicyStore) -> None:
    snapshot = store.snapshot
    assert store.reload() == ReloadOutcome(False, snapshot.revision)
    assert store.snapshot is snapshot


def test_a_bad_reload_keeps_the_old_set_and_says_why(
    store: PolicyStore, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = store.snapshot
    policy_file.write_text(INVALID)
    outcome = store.reload()
    assert not outcome.ok and not outcome.changed
    assert outcome.revision == snapshot.revision
    assert f"{policy_file}:3:" in outcome.problems[0]
    assert "nonsense" in outcome.problems[0]
    assert store.snapshot is snapshot
    assert allowed(store)
    assert "policy reload refused" in caplog.text


def test_a_deleted_file_keeps_the_old_set(store: PolicyStore, policy_file: Path) -> None:
    policy_file.unlink()
    outcome = store.reload()
    assert not outcome.ok
    assert allowed(store)


def test_reloading_new_entities(store: PolicyStore) -> None:
    old = store.revision
    outcome = store.reload(entities=EntityData.model_validate({**ENTITIES, "entitlements": []}))
    assert outcome.changed and store.revision != old
    assert not allowed(store)


def test_bad_entities_keep_the_old_set(store: PolicyStore) -> None:
    bad = {**ENTITIES, "models": [{**ENTITIES["models"][0], "max_data_class": "galactic"}]}
    outcome = store.reload(entities=EntityData.model_validate(bad))
    assert not outcome.ok
    assert "galactic" in outcome.problems[0]
    assert allowed(store)


def test_the_watcher_reloads_on_change_only(store: PolicyStore, policy_file: Path) -> None:
    seen: list[ReloadOutcome] = []
    watcher = PolicyWatcher(store, on_reload=seen.append)
    assert watcher.check() is None
    touch(policy_file, INVALID)
    refused = watcher.check()
    assert refused is not None and not refused.ok
    assert watcher.check() is None  # the same bad file is not retried every poll
    touch(policy_file, DENY)
    swapped = watcher.check()
    assert swapped is not None and swapped.changed
    assert [o.ok for o in seen] == [False, True]
    assert not allowed(store)


async def test_the_watcher_task_reloads_in_the_background(store: PolicyStore, policy_file: Path) -> None:
    task = asyncio.create_task(PolicyWatcher(store, interval=0.01).run())
    try:
        old = store.revision
        touch(policy_file, DENY)
        for _ in range(300):
            await asyncio.sleep(0.01)
            if store.revision != old:
                break
        assert store.revision != old
        assert not allowed(store)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
