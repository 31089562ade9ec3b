"""The gateway's own signing keys, kept in the state folder.

One file, `STATE/sts-keys.json` (mode 0600), holds the private keys as a JWKS,
newest first: the first signs, the others are previous keys that stay
published (and accepted) so that tokens they signed live out their minutes.

Created once: several workers starting together each write a temporary file
and hard-link it into place; the first link wins and every worker reads the
winner's key. A rotation rewrites the file under an exclusive lock and
replaces it atomically; other workers notice the new file (by its inode and
modification time) on their next use.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from joserfc import jwk
from joserfc.errors import JoseError

from idgate.errors import ConfigError

__all__ = ["KEYS_FILE", "SigningKeys"]

log = logging.getLogger("idgate.sts")

KEYS_FILE = "sts-keys.json"
ALGORITHMS = ("ES256", "RS256")


def _generate(algorithm: str) -> Any:
    key: Any
    if algorithm == "ES256":
        key = jwk.ECKey.generate_key("P-256", parameters={"use": "sig", "alg": "ES256"})
    elif algorithm == "RS256":
        key = jwk.RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"})
    else:
        raise ConfigError([f"sts.algorithm: `{algorithm}` is not one of {list(ALGORITHMS)}"])
    key.ensure_kid()
    return key


def _write_private(path: Path, document: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(document))
        out.flush()
        os.fsync(out.fileno())


class SigningKeys:
    """The gateway's signing keys: `current()` signs, `jwks()` publishes every key's public half."""

    def __init__(self, path: Path, algorithm: str = "ES256") -> None:
        self.path = path
        self._algorithm = algorithm
        self._stamp: tuple[int, int] | None = None
        self._keys: list[Any] = []

    @classmethod
    def open(cls, home: Path, algorithm: str = "ES256") -> SigningKeys:
        """The keys of the state folder `home`, creating the first one if there is none."""
        keys = cls(home / KEYS_FILE, algorithm)
        keys.ensure()
        return keys

    def ensure(self) -> None:
        """Create the key file unless it exists (safe when several processes race), then load it."""
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
            _write_private(tmp, {"keys": [_generate(self._algorithm).as_dict(private=True)]})
            try:
                os.link(tmp, self.path)  # first writer wins; the others read its key
                log.info("created the signing key of the token service in %s", self.path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        self._reload()

    def current(self) -> Any:
        """The key that signs now (a joserfc key with `kid` and `alg`)."""
        self._reload()
        return self._keys[0]

    def jwks(self) -> dict[str, Any]:
        """Every key's public half, current first: what `/.well-known/jwks.json` serves."""
        self._reload()
        return {"keys": [key.as_dict(private=False) for key in self._keys]}

    async def load_public(self) -> dict[str, Any]:
        """A `JWKSLoader` for the gateway's own `KeySet`: the published keys, read from the file."""
        return self.jwks()

    def rotate(self, keep: int = 2, algorithm: str | None = None) -> str:
        """Make a new current key, keep the `keep` newest previous ones; the new `kid`."""
        with self._locked():
            self._reload()
            new = _generate(algorithm or self._algorithm)
            document = {"keys": [new.as_dict(private=True), *(k.as_dict(private=True) for k in self._keys[:keep])]}
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
            _write_private(tmp, document)
            os.replace(tmp, self.path)
            self._reload()
        log.info("rotated the signing key of the token service: current `%s`", new.kid)
        return str(new.kid)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _reload(self) -> None:
        try:
            info = self.path.stat()
        except OSError as exc:
            raise ConfigError([f"signing keys `{self.path}` cannot be read: {exc.strerror}"]) from None
        stamp = (info.st_ino, info.st_mtime_ns)
        if stamp == self._stamp:
            return
        if stat.S_IMODE(info.st_mode) & 0o077:
            mode = oct(stat.S_IMODE(info.st_mode))
            raise ConfigError([f"signing keys `{self.path}` are readable by others (mode {mode}); `chmod 600` it"])
        try:
            document = orjson.loads(self.path.read_bytes())
            entries = document["keys"]
            if any(not isinstance(e, dict) or e.get("kty") not in ("EC", "RSA") for e in entries):
                raise ValueError("only EC and RSA keys sign gateway tokens")
            keys = [jwk.import_key(entry) for entry in entries]
        except (OSError, ValueError, KeyError, TypeError, JoseError) as exc:
            raise ConfigError([f"signing keys `{self.path}` are not a valid private JWKS: {exc}"]) from None
        if not keys or any(not key.is_private or not key.kid or key.alg not in ALGORITHMS for key in keys):
            raise ConfigError(
                [f"signing keys `{self.path}`: every key needs `kid`, `alg` ES256/RS256, its private part"]
            )
        self._keys = keys
        self._stamp = stamp
