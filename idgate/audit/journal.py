"""The commit journal: where a request's records become durable before its upstream call.

Invariant 6 wants the identity and decision records committed before anything
goes upstream, and the model record before the response completes: two
commits per request. As SQLite transactions they cost ~0.1 ms each on the
request path (BEGIN, the chain's head, the insert, the WAL write) and more
under load. As journal appends they cost one `write(2)` each.

So, for a trail kept in a local SQLite file, `AuditWriter.commit()` appends
the records' canonical bytes (what their chain hashes will cover), one JSON
line each, to this process's journal file and returns: the records are now
as durable as an SQLite commit with `synchronous=NORMAL` makes them (they
survive the process being killed, in the same folder as the trail). The
writer's thread then moves them from memory into the trail in batches (one
transaction per batch, chained there as always) and records, in that same
transaction, how far into which journal file the trail now reaches
(`audit_journals`), so nothing is moved twice.

A journal file is held with an exclusive `flock` by the process writing it.
When a process starts, every journal file nobody holds was left by a process
that stopped without finishing (`kill -9`, a crash, a lost machine power is
*not* covered: nothing is fsynced, as with SQLite's NORMAL mode): its records
past the recorded position are moved into the trail before the new process
serves (`AuditWriter.start`). A line cut short by the crash (a `write` that
never returned, so its request never went upstream) is skipped.

Files are rotated at `ROTATE_BYTES`; a rotated file is deleted once the trail
holds all of it, and every file at a clean close.

Between the append and the batch (milliseconds, or until the restart after
a crash) a record is in the journal but not yet in the hash chain: whoever
can write the state folder could change it there unseen. The same holds for
the chain's tail since the last signed checkpoint, and for the trail itself
to whoever can write it: the checkpoints are what prove it unaltered.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROTATE_BYTES", "Journal", "LeftOver", "journal_folder", "left_over"]

log = logging.getLogger("idgate.audit")

ROTATE_BYTES = 4 << 20
SUFFIX = ".jsonl"


def journal_folder(trail: Path) -> Path:
    """Where the journals of the SQLite trail at `trail` are kept: beside it."""
    return trail.with_name(trail.name + ".pending")


def _open_locked(path: Path, flags: int) -> int | None:
    """`path` opened with an exclusive lock, or None if another process holds it (or it is gone)."""
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class _File:
    __slots__ = ("fd", "name", "path", "size")

    def __init__(self, folder: Path) -> None:
        self.name = f"{os.getpid()}-{secrets.token_hex(6)}{SUFFIX}"
        self.path = folder / self.name
        fd = _open_locked(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC)
        if fd is None:  # a fresh, uniquely named file: only a bug gets here
            raise RuntimeError(f"cannot lock the new journal file `{self.path}`")
        self.fd = fd
        self.size = 0

    def remove(self) -> None:
        # why: unlink while still holding the lock, so a process that opened the file
        # just before sees it unlinked (no links left) once it gets the lock, and skips it.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)


class Journal:
    """This process's journal files in `folder`: appended on the event loop, retired by the writer's thread."""

    def __init__(self, folder: Path, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.folder = folder
        self._rotate_bytes = rotate_bytes
        self._lock = threading.Lock()
        self._current: _File | None = None
        self._closed = True
        self._retired: list[tuple[_File, int]] = []  # (file, its size when retired)

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            self._current = _File(self.folder)
            self._closed = False

    def append(self, data: bytes) -> tuple[str, int]:
        """Append `data` (whole lines); the file's name and its size after them. `OSError` if not all was written."""
        with self._lock:
            if self._closed:
                raise OSError("the audit journal is closed")
            current = self._current
            if current is None:
                current = self._current = _File(self.folder)
            try:
                written = os.write(current.fd, data)
                if written != len(data):
                    raise OSError(f"short write to the audit journal ({written} of {len(data)} bytes)")
            except OSError:
                # why: what went in may end in a torn line; later lines must not follow it in
                # the same file. The next append starts a new one.
                self._retire(current)
                raise
            current.size += written
            mark = (current.name, current.size)
            if current.size >= self._rotate_bytes:
                self._retire(current)
            return mark

    def _retire(self, current: _File) -> None:
        self._retired.append((current, current.size))
        self._current = None

    def settled(self, marks: dict[str, int]) -> None:
        """The trail now holds each file named in `marks` up to its offset: delete the retired files it holds whole."""
        if not self._retired:  # why: the common case takes no lock (the loop's appends hold it)
            return
        with self._lock:
            keep = []
            for file, size in self._retired:
                if marks.get(file.name, -1) >= size:
                    file.remove()
                else:
                    keep.append((file, size))
            self._retired = keep

    def seal(self) -> None:
        """Refuse appends from now on (`OSError`)."""
        with self._lock:
            self._closed = True

    def close(self, *, settled: bool) -> None:
        """Stop appending; delete the files if the trail holds everything (`settled`), else leave them for recovery."""
        with self._lock:
            files = [file for file, _ in self._retired]
            if self._current is not None:
                files.append(self._current)
            self._current, self._retired, self._closed = None, [], True
        for file in files:
            if settled:
                file.remove()
            else:
                os.close(file.fd)


@dataclass
class LeftOver:
    """A journal file left by a process that stopped; held locked until `remove()`."""

    path: Path
    fd: int

    @property
    def name(self) -> str:
        return self.path.name

    def lines(self, offset: int) -> list[bytes]:
        """The whole lines after `offset`, without their newlines (a torn last line is skipped)."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size - offset, offset) if size > offset else b""
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("audit journal %s: skipped a torn last line (%d bytes)", self.name, len(data) - end)
        return data[:end].split(b"\n")[:-1]

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)


def left_over(folder: Path) -> Iterator[LeftOver]:
    """The journal files in `folder` that no running process holds, each locked for the caller."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        fd = _open_locked(path, os.O_RDONLY | os.O_CLOEXEC)
        if fd is None:
            continue
        if os.fstat(fd).st_nlink == 0:  # its owner finished with it while we waited for the lock
            os.close(fd)
            continue
        yield LeftOver(path, fd)
