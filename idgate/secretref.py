"""`SecretRef`: where a secret lives — an environment variable or a file, never the YAML.

A module of its own, importing only pydantic and `idgate.errors`, so that every
settings module (imported by `idgate.config` while it is being built) can use it.
`Config.reveal(ref)` reads it with the environment the config was loaded with.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from idgate.errors import ConfigError

__all__ = ["SecretRef"]


class SecretRef(BaseModel):
    """Where a secret lives: an environment variable or a file, never the YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of `env` or `file`")
        return self

    def reveal(self, env: Mapping[str, str]) -> str:
        """Read the secret now; a missing one is a `ConfigError`."""
        if self.env is not None:
            value = env.get(self.env)
            if not value:
                raise ConfigError([f"secret: environment variable `{self.env}` is not set"])
            return value
        assert self.file is not None
        try:
            return self.file.read_text().strip()
        except OSError as exc:
            raise ConfigError([f"secret: file `{self.file}` cannot be read: {exc.strerror}"]) from None
