"""Prove the audit trail unaltered, or say exactly what was done to it and where.

`verify(path, jwks)` walks the records in `seq` order and checks, for each,
that its content still gives its hash, that no `seq` is missing, and that it
links to the record before it. Then each checkpoint: its signature, and that
the chain still holds the head it signed. Reading only; it never writes.

What the chain cannot show: records cut from the tail together with every
checkpoint that covered them. Checkpoints kept (or exported) elsewhere close
that gap.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from idgate.audit.chain import GENESIS, canonical, link, read_checkpoint

__all__ = ["Problem", "Report", "verify"]

_INDEXED = ("request_id", "kind", "time")


@dataclass(frozen=True, slots=True)
class Problem:
    """One break: `kind` is altered, deleted, inserted, reordered, unchained, checkpoint or truncated."""

    kind: str
    seq: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(slots=True)
class Report:
    records: int = 0
    checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """What `idgate audit verify` prints: one line per problem, or the all-clear."""
        if self.ok:
            return [*self.notes, f"ok: {self.records} records, {self.checkpoints} checkpoints, chain intact"]
        summary = f"broken: {len(self.problems)} problems in {self.records} records, {self.checkpoints} checkpoints"
        return [*self.notes, *(str(p) for p in self.problems), summary]


def _connect(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"no audit trail at `{path}`")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def verify(path: Path, jwks: dict[str, Any]) -> Report:
    """Check the trail in the SQLite file `path`; checkpoint signatures against the keys of `jwks`."""
    connection = _connect(path)
    try:
        rows = connection.execute(
            "SELECT seq, request_id, kind, time, record, prev_hash, hash FROM audit_records ORDER BY seq"
        ).fetchall()
        checkpoints = connection.execute("SELECT id, seq, hash, jws FROM audit_checkpoints ORDER BY id").fetchall()
    finally:
        connection.close()
    report = Report(records=len(rows), checkpoints=len(checkpoints))
    _check_chain(rows, report)
    _check_checkpoints(rows, checkpoints, jwks, report)
    return report


def _check_chain(rows: list[tuple[Any, ...]], report: Report) -> None:
    problems = report.problems
    where = {row[6]: row[0] for row in rows if row[6] is not None}  # hash -> seq
    legacy = 0
    while legacy < len(rows) and rows[legacy][6] is None and rows[legacy][5] is None:
        legacy += 1  # written before the trail was chained: nothing to check them against
    if legacy:
        report.notes.append(f"note: seq {rows[0][0]}..{rows[legacy - 1][0]} predate the hash chain; not verified")
    last_seq = rows[legacy - 1][0] if legacy else 0
    last_hash = GENESIS  # the chain starts at GENESIS, after any records that predate it
    for seq, request_id, kind, when, blob, prev_hash, digest in rows[legacy:]:
        what = f"seq {seq} (request `{request_id}`)"
        if seq > last_seq + 1:
            missing = f"seq {last_seq + 1}" if seq == last_seq + 2 else f"seq {last_seq + 1}..{seq - 1}"
            problems.append(Problem("deleted", last_seq + 1, f"{missing} missing, before seq {seq}"))
        if digest is None or prev_hash is None:
            problems.append(Problem("unchained", seq, f"{what} has no hash"))
        else:
            _check_record(seq, what, (request_id, kind, when), blob, prev_hash, digest, problems)
            if prev_hash != last_hash:
                other = where.get(prev_hash)
                if other is not None and other != seq:
                    after = "the start" if last_seq == 0 else f"seq {last_seq}"
                    problems.append(Problem("reordered", seq, f"{what} follows seq {other} in the chain, not {after}"))
                elif seq == last_seq + 1:  # a gap is reported as deleted already
                    problems.append(
                        Problem(
                            "inserted",
                            seq,
                            f"{what} does not link to seq {last_seq}; inserted, or seq {last_seq} replaced",
                        )
                    )
        last_seq, last_hash = seq, digest or ""


def _check_record(
    seq: int, what: str, columns: tuple[Any, ...], blob: Any, prev_hash: str, digest: str, problems: list[Problem]
) -> None:
    try:
        record = orjson.loads(blob)
        body = canonical(record)
    except (orjson.JSONDecodeError, TypeError):
        record, body = None, bytes(blob) if isinstance(blob, bytes) else str(blob).encode()
    if link(prev_hash, body) != digest:
        problems.append(Problem("altered", seq, f"{what}: content does not match its hash"))
        return
    if isinstance(record, dict):
        changed = [n for n, v in zip(_INDEXED, columns, strict=True) if record.get(n) != v]
        if changed:
            names = ", ".join(f"`{n}`" for n in changed)
            problems.append(Problem("altered", seq, f"{what}: column {names} differs from the record"))


def _check_checkpoints(
    rows: list[tuple[Any, ...]], checkpoints: list[tuple[Any, ...]], jwks: dict[str, Any], report: Report
) -> None:
    by_seq = {row[0]: row[6] for row in rows}
    last = rows[-1][0] if rows else 0
    for number, seq, digest, token in checkpoints:
        try:
            claims = read_checkpoint(token, jwks)
        except ValueError as exc:
            report.problems.append(
                Problem("checkpoint", seq, f"checkpoint {number} (seq {seq}): signature invalid: {exc}")
            )
            continue
        if (claims["seq"], claims["hash"]) != (seq, digest):
            report.problems.append(
                Problem(
                    "checkpoint", seq, f"checkpoint {number}: columns differ from what was signed (seq {claims['seq']})"
                )
            )
        signed_seq, signed_hash = claims["seq"], claims["hash"]
        if signed_seq not in by_seq:
            if signed_seq > last:
                report.problems.append(
                    Problem(
                        "truncated",
                        signed_seq,
                        f"checkpoint {number} signed seq {signed_seq}, but the trail ends at seq {last}:"
                        f" {signed_seq - last} or more records cut from the tail",
                    )
                )
            else:
                report.problems.append(
                    Problem("deleted", signed_seq, f"checkpoint {number} signed seq {signed_seq}, which is missing")
                )
        elif by_seq[signed_seq] != signed_hash:
            report.problems.append(
                Problem(
                    "checkpoint",
                    signed_seq,
                    f"checkpoint {number}: the chain at seq {signed_seq} is not what was signed (history rewritten)",
                )
            )
