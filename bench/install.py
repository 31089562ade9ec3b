"""Install what the benchmark needs and the project does not: wrk and LiteLLM.

* ``wrk`` comes from Debian (``apt-get install -y wrk``, after ``apt-get update``
  when the package lists are stale).
* LiteLLM's proxy goes into its own virtualenv, ``bench/.venv-litellm``
  (git-ignored), so none of its many dependencies touch the project's venv. It
  gets ``httptools`` too, so its uvicorn runs on uvloop + httptools like the
  others: LiteLLM is given its best shot.

Both steps do nothing when the tool is already there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

LITELLM_REQUIREMENTS = ("litellm[proxy]", "httptools")
_MARKER = ".bench-installed"


class InstallError(RuntimeError):
    pass


def _run(argv: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> bool:
    """Run `argv` with its output appended to `log`; True if it succeeded."""
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            done = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.write(f"failed: {exc}\n".encode())
            return False
    return done.returncode == 0


def ensure_wrk(log: Path) -> str:
    """The path of `wrk`, installing the Debian package if it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise InstallError("wrk is not installed and this is not root: run `apt-get install -y wrk`")
    print("installing wrk (apt-get install -y wrk) ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if not _run(install, log, 600, env) and not (
        _run(["apt-get", "update", "-q"], log, 600, env) and _run(install, log, 600, env)
    ):
        raise InstallError(f"`apt-get install -y wrk` failed; see {log}")
    found = shutil.which("wrk")
    if not found:
        raise InstallError(f"wrk is still not on PATH after installing it; see {log}")
    return found


def ensure_litellm(venv: Path, log: Path) -> Path:
    """The `litellm` command in `venv`, creating the venv and installing it if needed."""
    litellm = venv / "bin" / "litellm"
    if litellm.exists() and (venv / _MARKER).exists():
        return litellm
    print(
        f"installing LiteLLM into {venv} (pip install 'litellm[proxy]'), this takes a while ...",
        file=sys.stderr,
        flush=True,
    )
    python = venv / "bin" / "python"
    if not python.exists() and not _run([sys.executable, "-m", "venv", str(venv)], log, 300):
        raise InstallError(f"could not create the virtualenv {venv}; see {log}")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if not _run([*pip, *LITELLM_REQUIREMENTS], log, 1800):
        raise InstallError(f"`pip install 'litellm[proxy]'` failed; see {log}")
    if not litellm.exists():
        raise InstallError(f"LiteLLM installed but {litellm} is missing; see {log}")
    (venv / _MARKER).write_text(" ".join(LITELLM_REQUIREMENTS) + "\n")
    return litellm


def package_version(python: Path, package: str) -> str:
    """The installed version of `package` in the interpreter `python` ('' if unknown)."""
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
