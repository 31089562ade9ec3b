"""`idgate revoke`: the kill switch from a shell, for an operator on a gateway's machine.

The same hold as `POST /admin/revoke` (`idgate.sts.lifecycle`): every token naming
the subject, agent or tenant is refused — an agent anywhere in the actor chain —
whatever its `iat`, and no grant issues one, until lifted (`--lift`). It is
written to the state store the config names (the SQLite file in the state folder,
or PostgreSQL): every gateway sharing that store applies it within its
`liveness.poll_interval_seconds`. No HTTP and no admin token: whoever can run
this can already read the state folder (or the store's DSN), so the command asks
for nothing more — and the trail records who ran it (`by`: the OS user and host).

Each hold or lift is also an `action` record (`revocation`, `via: cli`) in the
audit trail, committed before the command exits; if the trail cannot take it,
the hold stands and the command says so and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
import sys
import time
from typing import Any

from idgate.audit.records import action_record
from idgate.audit.trail import build_writer
from idgate.config import Config, load_config
from idgate.errors import shown
from idgate.store import open_state_store
from idgate.store.base import StoreUnavailable
from idgate.sts.revocation import ANY_ISSUER, HELD, LIFTED

__all__ = ["add_revoke_command", "run_revoke"]


def add_revoke_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    revoke = commands.add_parser(
        "revoke", help="the kill switch: refuse every token of a subject, agent or tenant until lifted"
    )
    revoke.add_argument("--config", help="YAML config file (default: $IDGATE_CONFIG, else the embedded default)")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--subject", help="a subject id (with --issuer: only that issuer's subject)")
    target.add_argument("--agent", help="an agent id: refused anywhere in an actor chain")
    target.add_argument("--tenant", help="a tenant")
    revoke.add_argument("--issuer", help="with --subject: the issuer URL (`iss`) whose subject it is")
    revoke.add_argument("--reason", required=True, help="why (kept in the revocation log and the audit trail)")
    revoke.add_argument("--lift", action="store_true", help="end the hold instead")


def run_revoke(args: argparse.Namespace) -> int:
    if args.issuer is not None and args.subject is None:
        print("idgate: --issuer narrows a --subject only", file=sys.stderr)
        return 2
    if not args.reason.strip():
        print("idgate: --reason must say why", file=sys.stderr)
        return 2
    kind = "subject" if args.subject is not None else "agent" if args.agent is not None else "tenant"
    value: str = args.subject or args.agent or args.tenant
    scoped = (args.issuer or ANY_ISSUER) if kind == "subject" else None
    by = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    config = load_config(args.config)
    store = open_state_store(config)
    try:
        entry = store.revoke(
            kind,  # type: ignore[arg-type]
            value,
            issuer=scoped,
            at=time.time(),
            until=LIFTED if args.lift else HELD,
            reason=args.reason,
            by=by,
        )
    except StoreUnavailable as exc:
        print(f"idgate: nothing was {'lifted' if args.lift else 'revoked'}: the state store is unavailable ({exc})")
        return 1
    finally:
        store.close()
    done = "lifted" if args.lift else "held"
    details = {"kind": kind, "issuer": scoped, "seq": entry.seq, "reason": args.reason, "via": "cli", "by": by}
    details["lift" if args.lift else "hold"] = True
    record = action_record(f"cli-{int(time.time() * 1000)}", None, None, "revocation", value, done, details)
    what = f"{kind} `{shown(value)}`" + (f" of issuer `{shown(scoped)}`" if scoped not in (None, ANY_ISSUER) else "")
    if args.lift:
        print(f"lifted the hold on {what} (entry {entry.seq}); tokens revoked otherwise stay revoked")
    else:
        print(
            f"held {what} (entry {entry.seq}): every gateway sharing this state store refuses its tokens within"
            f" {config.liveness.poll_interval_seconds:g} s, until `idgate revoke --{kind} ... --lift`"
        )
    return _record(config, record)


def _record(config: Config, record: dict[str, Any]) -> int:
    writer = build_writer(config)
    try:
        writer.start()
        asyncio.run(writer.commit(record))
    except Exception as exc:  # noqa: BLE001 - any failure: the hold stands, the operator must know it is unrecorded
        print(f"idgate: done, but the audit trail could not record it ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    finally:
        writer.close()
    return 0
