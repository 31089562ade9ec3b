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
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROTATE_BYTES", "Journal", "LeftOver", "journal_folder", "left_over", "unmoved"]

log = logging.getLogger("idgate.audit")

ROTATE_BYTES = 4 << 20
SUFFIX = ".jsonl"
NEW = ".new"  # a journal file being created, not yet locked and named


def journal_folder(trail: Path) -> Path:
    """Where the journals of the SQLite trail at `trail` are kept: beside it."""
    return trail.with_name(trail.name + ".pending")


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class _File:
    __slots__ = ("fd", "name", "path", "size")

    def __init__(self, folder: Path) -> None:
        self.name = f"{os.getpid()}-{secrets.token_hex(6)}{SUFFIX}"
        self.path = folder / self.name
        # INVARIANT: a journal file is locked before it appears under its name: created under a
        # name recovery does not look at, locked, then renamed (the lock goes with the file).
        # why: a recovering process that found it unlocked and empty would delete it from under us.
        hidden = folder / f".{self.name}{NEW}"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # why: recreated if someone removed it
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if not _lock(fd):
                raise OSError(f"cannot lock the new journal file `{hidden}`")
            os.rename(hidden, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                hidden.unlink()
            raise
        self.fd = fd
        self.size = 0

    def gone(self) -> bool:
        """Was the file deleted under us (commits written to it would not survive a crash)?"""
        return os.fstat(self.fd).st_nlink == 0

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
        os.chmod(self.folder, 0o700)  # why: an existing folder keeps its mode; the records are the gateway's only
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
                # why: what went in is a refused commit's start; cut it off, so that neither a
                # recovery finds its whole lines nor later lines follow its torn one. If even
                # that fails, the next append starts a new file.
                try:
                    os.ftruncate(current.fd, current.size)
                except OSError:
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

    def replace_if_gone(self) -> bool:
        """If the file being appended to was deleted (or its folder), start a new one; whether it was.

        Commits acknowledged into a deleted file are still in memory, on their way to the trail,
        but would not survive a crash: the writer's thread checks on every pass.
        """
        current = self._current
        if current is None or not current.gone():
            return False
        with self._lock:
            if self._current is current:
                self._retire(current)
        return True

    def settled(self, marks: dict[str, int]) -> None:
        """The trail now holds each file named in `marks` up to its offset: delete the retired files it holds whole."""
        if not self._retired:  # why: the common case takes no lock (the loop's appends hold it)
            return
        with self._lock:
            keep = []
            for file, size in self._retired:
                if size == 0 or marks.get(file.name, -1) >= size:
                    file.remove()
                else:
                    keep.append((file, size))
            self._retired = keep

    def seal(self) -> None:
        """Refuse appends from now on (`OSError`)."""
        with self._lock:
            self._closed = True

    def close(self, *, settled: bool, stuck: bool = False) -> None:
        """Stop appending; delete the files if the trail holds everything (`settled`), else leave them for recovery.

        `stuck`: the writer's thread is still at work on them: keep them open (and locked) until this process
        ends, or a starting process would move them while the thread still may.
        """
        with self._lock:
            files = [file for file, _ in self._retired]
            if self._current is not None:
                files.append(self._current)
            self._current, self._retired, self._closed = None, [], True
        for file in files:
            if settled:
                file.remove()
            elif not stuck:
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

    def release(self) -> None:
        os.close(self.fd)


def left_over(folder: Path) -> Iterator[LeftOver]:
    """The journal files in `folder` that no running process holds, each locked for the caller."""
    if not folder.is_dir():
        return
    stale = time.time() - 60  # why: a live process names its new file within microseconds of creating it
    for path in folder.glob(f".*{SUFFIX}{NEW}"):  # a process died between creating and naming one: empty
        with contextlib.suppress(FileNotFoundError):
            if path.lstat().st_mtime < stale:
                path.unlink()
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:  # why: O_NOFOLLOW and O_NONBLOCK: a planted symlink or FIFO neither redirects nor hangs us
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OSError(f"audit journal `{path}` cannot be opened ({exc.strerror}); it is not one of ours") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise OSError(f"audit journal `{path}` is not a regular file; it is not one of ours")
        if not _lock(fd) or os.fstat(fd).st_nlink == 0:  # held by a live process, or deleted by its owner meanwhile
            os.close(fd)
            continue
        yield LeftOver(path, fd)


def unmoved(folder: Path, positions: dict[str, int]) -> int:
    """How many journal lines in `folder` lie past the positions the trail reached (read only, no lock taken).

    why no lock: a reader holding one would make a starting gateway skip the file as a live one's.
    """
    count = 0
    if not folder.is_dir():
        return 0
    for path in folder.glob(f"*{SUFFIX}"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                count += len(LeftOver(path, fd).lines(positions.get(path.name, 0)))
        finally:
            os.close(fd)
    return count
