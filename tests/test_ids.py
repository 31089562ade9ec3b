"""Request and trace ids: random bytes from the OS, handed out once, fresh in a forked child."""

from __future__ import annotations

import os
import re
import threading

from idgate.audit.records import new_trace_id
from idgate.ids import random_hex
from idgate.proxy.http import new_request_id


def test_ids_have_their_shapes_and_never_repeat() -> None:
    requests = {new_request_id() for _ in range(20_000)}
    traces = {new_trace_id() for _ in range(20_000)}
    assert len(requests) == len(traces) == 20_000  # across several 4 KiB pools
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", r) for r in requests)
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) and t != "0" * 32 for t in traces)
    assert sorted(requests)[0][:16] <= new_request_id()[:16]  # the time prefix sorts


def test_threads_never_get_the_same_bytes() -> None:
    got: list[list[str]] = [[] for _ in range(8)]

    def take(mine: list[str]) -> None:
        mine.extend(random_hex(16) for _ in range(5_000))

    threads = [threading.Thread(target=take, args=(mine,)) for mine in got]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [value for mine in got for value in mine]
    assert len(set(every)) == len(every) == 40_000


def test_a_forked_child_does_not_hand_out_its_parents_bytes() -> None:
    random_hex(16)  # the parent's pool is filled
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, "".join(random_hex(16) for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    theirs = os.read(read, 1000).decode()
    os.close(read)
    ours = "".join(random_hex(16) for _ in range(10))
    assert len(theirs) == len(ours) == 320 and theirs != ours
