"""Settings of the audit trail, hung under `Config.audit`.

`idgate.config` imports this module after it has defined `SecretRef` (which
the PostgreSQL DSN may be), so only that is taken from it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from idgate.config import SecretRef

__all__ = ["AuditExportSettings", "AuditSettings"]

# A password in a DSN: `password=...` (key/value form) or `user:secret@` (URL form).
_DSN_PASSWORD = re.compile(r"(?i)\bpassword\s*=|://[^/@:]*:[^/@]*@")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AuditExportSettings(_Frozen):
    """Copies of every committed record, for a SIEM or a tracing backend."""

    jsonl: str | None = Field(None, description="append each record as a JSON line to this file, or `-` for stdout")
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP base URL (e.g. http://collector:4318): a span per request, records as log events",
    )
    otlp_timeout_seconds: float = Field(5.0, gt=0, le=60, description="timeout of one OTLP export")
    service_name: str = Field("idgate", min_length=1, description="`service.name` of the exported spans and logs")

    @field_validator("otlp_endpoint")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("the OTLP endpoint must be an http:// or https:// URL")
        return value.rstrip("/") if value else value


class AuditSettings(_Frozen):
    backend: Literal["sqlite", "postgres"] = Field("sqlite", description="where the trail is kept")
    path: Path | None = Field(None, description="SQLite file; default STATE/audit.db")
    postgres_dsn: SecretRef | str | None = Field(
        None,
        description="PostgreSQL connection string (libpq DSN or URL); with a password, give it as `{env}` or `{file}`",
    )
    postgres_schema: str = Field(
        "idgate_audit", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", description="schema holding the trail's tables"
    )
    flush_interval_seconds: float = Field(
        0.05,
        gt=0,
        le=1,
        description="how often the writer moves records into the store in one transaction (commits are durable"
        " before that: in the journal for SQLite, group-committed for PostgreSQL)",
    )
    checkpoint_every: int = Field(1000, gt=0, description="records between signed checkpoints of the hash chain")
    commit_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="longest wait for the pre-forward commit; longer is a 503"
    )
    retention_days: float | None = Field(
        None, gt=0, description="delete records older than this (up to a checkpoint, kept as the chain's anchor)"
    )
    fail_open_reads: bool = Field(
        False, description="serve GET /v1/models while the store is down; how many were unrecorded goes on record"
    )
    record_content: bool = Field(
        False,
        description="keep the prompt and completion text in model records, redacted by the detectors"
        " (each at most 64 KiB); off: only their SHA-256",
    )
    export: AuditExportSettings = AuditExportSettings()

    @property
    def new_trace_flags(self) -> str:
        """The upstream `traceparent` flags of a trace the gateway starts: sampled when its spans are exported."""
        return "01" if self.export.otlp_endpoint else "00"

    @field_validator("postgres_dsn")
    @classmethod
    def _no_inline_password(cls, value: SecretRef | str | None) -> SecretRef | str | None:
        if isinstance(value, str) and _DSN_PASSWORD.search(value):
            raise ValueError("a DSN with a password is a secret: use `{env: NAME}` or `{file: PATH}`")
        return value

    @model_validator(mode="after")
    def _postgres_needs_dsn(self) -> AuditSettings:
        if self.backend == "postgres" and self.postgres_dsn is None:
            raise ValueError("`backend: postgres` needs `postgres_dsn`")
        return self
