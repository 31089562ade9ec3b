"""The audit trail a config describes: its store, its writer, its exports.

`open_store(config)` gives the store (SQLite at `audit.path`, or PostgreSQL
at `audit.postgres_dsn`) for the gateway and for `idgate audit verify`,
`query` and `explain`; `build_writer(config, sign)` the writer the gateway
runs, with the exports (`audit.export`) and retention (`audit.retention_days`)
the config asks for.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from idgate.audit.chain import CheckpointSigner
from idgate.audit.export import JsonlExport, OtlpExport
from idgate.audit.records import action_record
from idgate.audit.stores import PostgresStore, SqliteStore, Store
from idgate.audit.writer import AuditWriter, Sink
from idgate.config import Config

__all__ = ["build_writer", "config_loaded_record", "open_store"]


def config_loaded_record(config: Config, policy_revision: str) -> dict[str, Any]:
    """The configuration a gateway process started with: its hash and what it trusts (secret refs by name only)."""
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()
    details = {
        "config_sha256": digest,
        "policy_revision": policy_revision,
        "issuers": [i.name for i in (*config.issuers, *config.spiffe)],
        "dev_issuer": config.dev_issuer.enabled,
        "models": [m.name for m in config.models],
        "audit_backend": config.audit.backend,
    }
    return action_record(f"start-{int(time.time() * 1000)}", None, None, "config_loaded", "config", "ok", details)


def open_store(config: Config, sign: CheckpointSigner | None = None) -> Store:
    settings = config.audit
    if settings.backend == "postgres":
        dsn = settings.postgres_dsn
        assert dsn is not None, "checked when the config was loaded"
        return PostgresStore(
            dsn if isinstance(dsn, str) else config.reveal(dsn),
            settings.postgres_schema,
            sign=sign,
            checkpoint_every=settings.checkpoint_every,
        )
    return SqliteStore(config.audit_path, sign=sign, checkpoint_every=settings.checkpoint_every)


def build_writer(config: Config, sign: CheckpointSigner | None = None) -> AuditWriter:
    settings = config.audit
    sinks: list[Sink] = []
    if settings.export.jsonl is not None:
        sinks.append(JsonlExport(settings.export.jsonl))
    if settings.export.otlp_endpoint is not None:
        otlp = OtlpExport(
            settings.export.otlp_endpoint,
            service_name=settings.export.service_name,
            timeout=settings.export.otlp_timeout_seconds,
        )
        otlp.start()
        sinks.append(otlp)
    retention = None if settings.retention_days is None else settings.retention_days * 86400
    return AuditWriter(
        config.audit_path if settings.backend == "sqlite" else None,
        settings.flush_interval_seconds,
        store=open_store(config, sign),
        commit_timeout=settings.commit_timeout_seconds,
        sinks=tuple(sinks),
        retention_seconds=retention,
    )
