"""The store's shared counters (the MCP budgets), on every backend: atomic, limited, shared, expiring."""

from __future__ import annotations

import threading
import time

from idgate.store.base import Counter, StateStore
from tests.store.conftest import OpenStore


def test_counting_up_stops_at_the_limit_and_counts_nothing_then(store: StateStore) -> None:
    now = time.time()
    calls, writes = Counter("task:t1:calls", 3, now + 60), Counter("task:t1:writes", 1, now + 60)
    assert store.count_up([calls, writes], now) == (True, (1, 1))
    # The write budget is used up: neither counter moves.
    assert store.count_up([calls, writes], now) == (False, (1, 1))
    assert store.count_up([calls], now) == (True, (2,))
    assert store.count_up([calls], now) == (True, (3,))
    assert store.count_up([calls], now) == (False, (3,))
    assert store.count_up([Counter("task:t2:calls", 3, now + 60)], now) == (True, (1,))  # each key its own


def test_counters_are_shared_by_every_handle(open_store: OpenStore) -> None:
    one, two = open_store(), open_store()  # e.g. two workers
    now = time.time()
    counter = Counter("agent:iss:bot:calls", 2, now + 60)
    assert one.count_up([counter], now) == (True, (1,))
    assert two.count_up([counter], now) == (True, (2,))
    assert one.count_up([counter], now) == (False, (2,))


def test_a_counter_past_its_until_starts_again_and_is_forgotten(store: StateStore) -> None:
    now = time.time()
    counter = Counter("agent:iss:bot:w1", 1, now + 10)
    assert store.count_up([counter], now) == (True, (1,))
    assert store.count_up([counter], now + 5) == (False, (1,))
    later = now + 11
    assert store.count_up([Counter(counter.key, 1, later + 10)], later) == (True, (1,))
    assert store.forget(later + 11) == 1
    assert store.forget(later + 11) == 0


def test_concurrent_count_ups_never_exceed_the_limit(open_store: OpenStore) -> None:
    stores = [open_store() for _ in range(4)]
    now = time.time()
    counter = Counter("task:busy:calls", 30, now + 60)
    granted: list[int] = []
    lock = threading.Lock()

    def spend(store: StateStore) -> None:
        for _ in range(15):
            added, (count,) = store.count_up([counter], now)
            if added:
                with lock:
                    granted.append(count)

    threads = [threading.Thread(target=spend, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(granted) == list(range(1, 31))
