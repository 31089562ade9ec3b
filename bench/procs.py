"""Start, watch and stop the processes of a benchmark run.

Every process is started in its own session (so it and its children form one
process group that can be stopped as a whole), optionally pinned to a CPU with
``taskset``, with stdout and stderr going to a log file. `Processes` remembers
what it started and stops all of it on exit, whatever the exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

STOP_GRACE_SECONDS = 10.0


class StartError(RuntimeError):
    """A process did not come up; the message says why and ends with its log."""


def free_port() -> int:
    """A TCP port on loopback that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """`argv` run under ``taskset -c CPU`` (unchanged when `cpu` is None)."""
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if self.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


class Processes:
    """Starts processes and stops every one of them on exit (also on errors)."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._started: list[Process] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Process:
        log = self._log_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                pinned(argv, cpu),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self._started.append(process)
        return process

    def stop(self, process: Process) -> None:
        process.stop()
        if process in self._started:
            self._started.remove(process)

    def stop_all(self) -> None:
        while self._started:
            self._started.pop().stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def wait_http(process: Process, url: str, timeout: float, ok: Sequence[int] = (200,)) -> None:
    """Wait until GET `url` answers with a status in `ok`, or fail with the log."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.alive():
            raise StartError(
                f"{process.name} exited with status {process.popen.returncode} before it was ready"
                f"; last lines of {process.log}:\n{log_tail(process.log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (OSError, ValueError) as exc:
            last = str(exc)
            time.sleep(0.2)
            continue
        if status in ok:
            return
        last = f"HTTP {status}"
        time.sleep(0.2)
    raise StartError(
        f"{process.name} was not ready at {url} within {timeout:.0f}s ({last})"
        f"; last lines of {process.log}:\n{log_tail(process.log)}"
    )
