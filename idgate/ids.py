"""Random ids for requests and traces, from the OS's random bytes, without a system call each.

`os.urandom` is cheap (~0.5 us), but it lets go of the GIL for its system call:
under load the audit writer's thread took the GIL at that moment, and the request
waited for it to come back (~12 us per id in an in-process profile, two ids per
request). The bytes still come from `os.urandom`, 4 KiB at a time; each is handed
out once, to one caller (a lock), and a forked child starts a pool of its own.
"""

from __future__ import annotations

import os
import threading

__all__ = ["random_hex"]

_POOL_BYTES = 4096
_lock = threading.Lock()
_pool = b""
_taken = 0


def random_hex(size: int) -> str:
    """`size` random bytes (at most 4096) as lowercase hex."""
    global _pool, _taken
    with _lock:
        if _taken + size > len(_pool):
            _pool, _taken = os.urandom(_POOL_BYTES), 0
        start = _taken
        _taken += size
        return _pool[start:_taken].hex()


def _forget() -> None:
    # why: a forked child must not hand out the bytes its parent (or a sibling) will
    global _pool, _taken
    _pool, _taken = b"", 0


os.register_at_fork(after_in_child=_forget)
