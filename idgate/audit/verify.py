"""Prove the audit trail unaltered, or say exactly what was done to it and where.

`verify(trail, jwks)` walks the records in `seq` order and checks, for each,
that its content still gives its hash, that no `seq` is missing, and that it
links to the record before it. Then each checkpoint: its signature, and that
the chain still holds the head it signed. Reading only; it never writes.

Retention deletes the oldest records up to a signed checkpoint and keeps that
checkpoint: the chain is then checked from the hash it signs.

What the chain cannot show: records cut from the tail together with every
checkpoint that covered them. Checkpoints kept (or exported) elsewhere close
that gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from idgate.audit.chain import GENESIS, canonical, link, read_checkpoint
from idgate.audit.journal import journal_folder, unmoved
from idgate.audit.stores import ChainRow, CheckpointRow, SqliteStore, Store

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


def verify(trail: Path | Store, jwks: dict[str, Any]) -> Report:
    """Check the trail (a SQLite file, or a store); checkpoint signatures against the keys of `jwks`."""
    store = SqliteStore(trail) if isinstance(trail, Path) else trail
    rows = store.chain_rows()
    checkpoints = store.checkpoint_rows()
    report = Report(records=len(rows), checkpoints=len(checkpoints))
    start = _anchor(rows, checkpoints, jwks, report)
    _check_chain(rows, report, start)
    _check_checkpoints(rows, checkpoints, jwks, report, start[0])
    if isinstance(store, SqliteStore):
        waiting = unmoved(journal_folder(store.path), store.journal_positions())
        if waiting:
            report.notes.append(
                f"note: {waiting} records are in the commit journal, not yet in the trail (a running gateway"
                " moves them within `audit.flush_interval_seconds`; a stopped one's, at the next start)"
            )
    return report


def _anchor(
    rows: list[ChainRow], checkpoints: list[CheckpointRow], jwks: dict[str, Any], report: Report
) -> tuple[int, str]:
    """Where the chain starts: GENESIS at seq 0, or a signed checkpoint that retention kept as its anchor."""
    first = rows[0][0] if rows else None
    if first is None or first == 1 or rows[0][5] is None:
        return 0, GENESIS
    for _, seq, digest, token in checkpoints:
        if seq != first - 1:
            continue
        try:
            claims = read_checkpoint(token, jwks)
        except ValueError:
            continue  # reported with the other checkpoints
        if (claims["seq"], claims["hash"]) == (seq, digest):
            report.notes.append(f"note: seq 1..{seq} pruned by retention; the chain is anchored at checkpoint {seq}")
            return seq, digest
    return 0, GENESIS


def _check_chain(rows: list[ChainRow], report: Report, start: tuple[int, str]) -> None:
    problems = report.problems
    where = {row[6]: row[0] for row in rows if row[6] is not None}  # hash -> seq
    legacy = 0
    while legacy < len(rows) and rows[legacy][6] is None and rows[legacy][5] is None:
        legacy += 1  # written before the trail was chained: nothing to check them against
    if legacy:
        report.notes.append(f"note: seq {rows[0][0]}..{rows[legacy - 1][0]} predate the hash chain; not verified")
    last_seq = rows[legacy - 1][0] if legacy else start[0]
    last_hash = start[1]  # the chain starts at GENESIS (or its anchor), after any records that predate it
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
    rows: list[ChainRow], checkpoints: list[CheckpointRow], jwks: dict[str, Any], report: Report, anchor: int
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
        if anchor and signed_seq <= anchor:
            continue  # the anchor (checked above), or one left from before pruning
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
