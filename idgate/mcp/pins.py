"""Tool pins: a tool's description and schemas, fixed by hash when first approved.

A tool server can change what a tool says it does after a client has come to
trust it (the "rug pull"): a harmless `read_invoice` whose description later
tells the model to send the invoice elsewhere. So the gateway pins each tool's
SHA-256 over its name, title, description, input and output schemas and
annotations the first time it lists the tool (trust on first use: the
listing is the approval). When a listing later shows another hash, that
tool is withheld from `tools/list` and refused on `tools/call` until someone
re-approves it (`idgate mcp approve SERVER TOOL`, which pins the new hash).

State: `STATE/mcp-pins.json`, `{server: {tool: {"pinned": HASH, "pending": HASH|null}}}`,
replaced atomically under a lock; other workers and the CLI see a change within
a second (the file's inode and modification time are looked at most once a second).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

__all__ = ["PINS_FILE", "PinStore", "Verdict", "tool_hash"]

PINS_FILE = "mcp-pins.json"
_LOOK_EVERY = 1.0  # seconds between looks at the file for changes made elsewhere
_PINNED_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")

Verdict = Literal["pinned", "approved", "changed"]


def tool_hash(tool: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of what a tool tells a model about itself, in canonical JSON."""
    fields = {k: tool.get(k) for k in _PINNED_FIELDS}
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class Pin:
    pinned: str
    pending: str | None = None


class PinStore:
    """The pins of every server's tools, in one JSON file under the state folder."""

    def __init__(self, home: Path) -> None:
        self.path = home / PINS_FILE
        self._stamp: tuple[int, int] | None = None
        self._pins: dict[str, dict[str, Pin]] = {}
        self._looked = -1.0  # monotonic time of the last look at the file

    def check(self, server: str, tool: str, digest: str) -> Verdict:
        """The tool's state: "approved" (its pin), "pinned" (first seen: pinned now) or "changed" (withheld)."""
        self._reload(now=True)  # a listing sees an approval at once; a call within a second
        pin = self._pins.get(server, {}).get(tool)
        if pin is not None and pin.pinned == digest:
            return "approved"
        if pin is not None and pin.pending == digest:
            return "changed"  # already on record as changed
        with self._locked() as pins:
            current = pins.setdefault(server, {}).get(tool)
            if current is None:
                pins[server][tool] = Pin(digest)
                return "pinned"
            if current.pinned == digest:
                return "approved"
            pins[server][tool] = Pin(current.pinned, digest)
            return "changed"

    def withheld(self, server: str, tool: str) -> bool:
        """Whether `tool` has changed since it was pinned and awaits approval."""
        self._reload()
        pin = self._pins.get(server, {}).get(tool)
        return pin is not None and pin.pending is not None

    def approve(self, server: str, tool: str | None = None) -> list[str]:
        """Pin the pending hash of `tool` (or of every changed tool of `server`); the tools approved."""
        approved = []
        with self._locked() as pins:
            for name, pin in list(pins.get(server, {}).items()):
                if (tool is None or name == tool) and pin.pending is not None:
                    pins[server][name] = Pin(pin.pending)
                    approved.append(name)
        return approved

    def listing(self) -> dict[str, dict[str, dict[str, str | None]]]:
        """Every pin, for `idgate mcp pins`."""
        self._reload()
        return {
            server: {name: {"pinned": pin.pinned, "pending": pin.pending} for name, pin in tools.items()}
            for server, tools in self._pins.items()
        }

    # -- the file ------------------------------------------------------------------------

    def _reload(self, *, now: bool = False) -> None:
        moment = time.monotonic()
        if not now and moment - self._looked < _LOOK_EVERY:
            return
        self._looked = moment
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._pins, self._stamp = {}, None
            return
        stamp = (info.st_ino, info.st_mtime_ns)
        if stamp != self._stamp:
            self._pins = _parse(self.path.read_bytes())
            self._stamp = stamp

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Pin]]]:
        """The pins, read under an exclusive lock, written back when the block ends without error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._stamp = None
            self._reload(now=True)
            pins = {server: dict(tools) for server, tools in self._pins.items()}
            yield pins
            document = {
                server: {name: {"pinned": p.pinned, "pending": p.pending} for name, p in tools.items()}
                for server, tools in pins.items()
            }
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
            tmp.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
            os.replace(tmp, self.path)
            self._stamp = None
            self._reload(now=True)
        finally:
            os.close(fd)


def _parse(raw: bytes) -> dict[str, dict[str, Pin]]:
    try:
        document = orjson.loads(raw)
        return {
            str(server): {str(name): Pin(str(p["pinned"]), p.get("pending")) for name, p in tools.items()}
            for server, tools in document.items()
        }
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        # Fail closed: a damaged pin file is an error, never "nothing pinned" (which would re-pin anything).
        raise ValueError(f"tool pins are damaged: {exc}") from None
