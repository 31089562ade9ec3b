"""Secret keys kept in the state folder: one file each, made once, shared by every worker.

The pseudonym key, the DPoP nonce key and the MCP session-id key are such keys.
The first worker that needs one writes it (mode 0600) to a private temporary
file and links it into place; a worker that loses the race reads the winner's.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["state_key"]


def state_key(home: Path, name: str) -> bytes:
    """The 32-byte key in `home/name` (hex), created by the first worker that asks for it."""
    path = home / name
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # the first writer wins; every other worker reads its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise OSError(f"key file `{path}` is not hex; remove it to have a new key made") from None
    if len(key) < 32:
        raise OSError(f"key file `{path}` holds fewer than 32 bytes; remove it to have a new key made")
    return key
