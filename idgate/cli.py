"""`idgate ...`: serve, mint development tokens, check configurations."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import yaml

from idgate.config import Config, config_schema, load_config, with_listen
from idgate.errors import ConfigError
from idgate.identity.devissuer import DevIssuer
from idgate.identity.pseudonym import Pseudonyms
from idgate.mcp.cli import add_commands as add_mcp_commands
from idgate.mcp.cli import run as run_mcp
from idgate.sts.cli import add_revoke_command, run_revoke

if TYPE_CHECKING:
    from idgate.app import IdgateApp

__all__ = ["main"]

# Young objects the collector lets pile up before it runs (CPython's default is 700).
# why: a request allocates a few hundred tracked objects (coroutines, dicts, aiohttp
# and uvicorn state) that almost all die by reference counting; at 700 the collector
# ran every few requests. Measured on the benchmark: GC was a large share of the
# gateway's CPU and most of its p99.
GC_YOUNG_THRESHOLD = 10_000


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"`{text}` is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"`{text}` is out of range; expected {low} to {high}")
        return value

    parse.__name__ = "number"  # argparse names the type in its own messages
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idgate", description="identity-aware gateway for LLM and tool access")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the gateway (no config: the embedded development profile)")
    serve.add_argument("--config", help="YAML config file (default: $IDGATE_CONFIG, else the embedded default)")
    serve.add_argument("--host", help="address to listen on (overrides server.host)")
    serve.add_argument("--port", type=_bounded(0, 65535), help="port to listen on (overrides server.port)")
    serve.add_argument(
        "--workers", type=_bounded(1, 1024), default=1, help="worker processes sharing the port (default 1)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    token = commands.add_parser("token", help="print a token from the development issuer")
    token.add_argument("--config", help="YAML config file (default: $IDGATE_CONFIG, else the embedded default)")
    token.add_argument("--sub", default="dev-user", help="subject id (default dev-user)")
    token.add_argument("--kind", default="human", choices=["human", "service", "agent"])
    token.add_argument("--tenant", help="tenant (default: dev_issuer.tenant)")
    token.add_argument(
        "--act",
        action="append",
        default=[],
        metavar="AGENT",
        help="an agent acting for the subject; repeat for a chain, outermost first",
    )
    token.add_argument("--group", action="append", default=[], help="a group of the subject; repeatable")
    token.add_argument("--task", help="the task the token is for (policies may require one for agents)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")

    policy = commands.add_parser("policy", help="test policies")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    policy_test = policy_commands.add_parser("test", help="run a YAML file of policy cases; non-zero on any mismatch")
    policy_test.add_argument("file")

    config = commands.add_parser("config", help="check a config or print its JSON schema")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate FILE and say exactly what is wrong and where")
    check.add_argument("file")
    config_commands.add_parser("schema", help="print the JSON schema of the config file")

    keys = commands.add_parser("keys", help="manage the gateway's signing keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    rotate = keys_commands.add_parser(
        "rotate", help="make a new signing key; the previous ones stay published (sts.previous_keys)"
    )
    rotate.add_argument("--config", help="YAML config file (default: $IDGATE_CONFIG, else the embedded default)")

    add_mcp_commands(commands)
    add_revoke_command(commands)

    audit = commands.add_parser("audit", help="check the audit trail")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_commands.add_parser(
        "verify",
        help="check the hash chain and signed checkpoints; say what was altered and where; non-zero on a break",
    )
    audit_verify.add_argument("--config", help="YAML config file (default: $IDGATE_CONFIG, else the embedded default)")
    audit_query = audit_commands.add_parser("query", help="list requests by who, for whom, what and when; newest first")
    audit_query.add_argument("--config", help="YAML config file (default: $IDGATE_CONFIG, else the embedded default)")
    audit_query.add_argument("--subject", help="the subject's id (e.g. the human an agent acted for)")
    audit_query.add_argument("--agent", help="an agent anywhere in the actor chain")
    audit_query.add_argument("--tenant", help="the subject's tenant")
    audit_query.add_argument("--task", help="the credential's task")
    audit_query.add_argument("--model", help="the model asked for")
    audit_query.add_argument("--tool", help="a tool offered, removed or flagged")
    audit_query.add_argument(
        "--decision",
        choices=["allow", "deny"],
        help="what policy decided about the request (deny: refused; allow: let through, perhaps with tools removed)",
    )
    audit_query.add_argument("--since", metavar="WHEN", help="from this time: ISO-8601 or an age like 2h, 7d")
    audit_query.add_argument("--until", metavar="WHEN", help="up to this time: ISO-8601 or an age like 2h, 7d")
    audit_query.add_argument("--limit", type=_bounded(1, 1_000_000), default=100, help="at most N rows (default 100)")
    audit_query.add_argument("--json", action="store_true", help="print the records as JSON lines")
    audit_explain = audit_commands.add_parser("explain", help="tell one request's story: who, for whom, why, what")
    audit_explain.add_argument("request_id", metavar="REQUEST_ID")
    audit_explain.add_argument("--config", help="YAML config file (default: $IDGATE_CONFIG, else the embedded default)")
    return parser


def tune_gc() -> None:
    """Set up the garbage collector for serving; call once the app is built.

    `gc.freeze()` moves everything alive now (modules, the config, the policy store,
    the app) out of the collector's sight: those objects live as long as the
    process, and without this every full collection walks all of them again. Only
    what requests allocate afterwards is collected, and less often.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def worker_app() -> IdgateApp:
    """Factory for each worker of `idgate serve --workers N` (reads `IDGATE_CONFIG`)."""
    from idgate.app import app_from_environment

    app = app_from_environment()
    tune_gc()
    return app


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    config = with_listen(load_config(args.config), args.host, args.port)
    # Keys are created here, once, before any worker starts.
    if config.dev_issuer.enabled:
        DevIssuer(config).ensure_key()
    Pseudonyms.from_state(config.home)
    _print_welcome(config, args.config)
    options = {
        "host": config.server.host,
        "port": config.server.port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        # The gateway takes no client address or scheme from `X-Forwarded-*` headers
        # (identity comes only from verified credentials), so uvicorn need not parse them.
        "proxy_headers": False,
        "server_header": False,
        "log_level": args.log_level,
        "timeout_graceful_shutdown": 10,
    }
    from idgate.serve import uvicorn_options

    options.update(uvicorn_options(config))  # `server.tls`: HTTPS, client certificates handed to the app
    if args.workers <= 1:
        from idgate.app import build_app

        app = build_app(config)
        tune_gc()
        uvicorn.run(app, **options)
        return 0
    # Workers load exactly the config validated here, from a file in the state folder.
    effective = config.home / "effective-config.yaml"
    data = config.model_dump(mode="json", exclude_none=True)
    data["state"] = {**data.get("state", {}), "home": str(config.home)}  # keep the state backend
    effective.write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["IDGATE_CONFIG"] = str(effective)
    uvicorn.run("idgate.cli:worker_app", factory=True, workers=args.workers, **options)
    return 0


def _token_command(config: Config, config_file: str | None) -> str:
    """A shell command, runnable from any folder, that mints a token this gateway accepts."""
    script = Path(sys.executable).with_name("idgate")  # the venv's console script, not resolved
    if shutil.which("idgate") == str(script):
        command = "idgate"
    elif script.exists():
        command = shlex.quote(str(script))
    else:
        command = f"{shlex.quote(sys.executable)} -m idgate"
    config_file = config_file or os.environ.get("IDGATE_CONFIG") or None
    if config_file is not None:
        command += f" --config {shlex.quote(str(Path(config_file).resolve()))}"
    # The key lives in the state folder, which would otherwise depend on the folder the command runs in.
    return f"IDGATE_HOME={shlex.quote(str(config.home))} {command} token --sub alice"


def _print_welcome(config: Config, config_file: str | None) -> None:
    url = config.server.url
    lines = [f"idgate: serving on {url}", f"idgate: state in {config.home}"]
    if config.dev_issuer.enabled:
        models = ", ".join(m.name for m in config.models) or "none"
        first_model = next((m.name for m in config.models if m.kind == "chat"), "MODEL")
        lines += [
            "idgate: development issuer is ON (turn it off in production)",
            f"idgate: models: {models}",
            "",
            "  try it:",
            f"    export OPENAI_API_KEY=$({_token_command(config, config_file)})",
            f"    export OPENAI_BASE_URL={url}/v1",
            '    curl -s $OPENAI_BASE_URL/chat/completions -H "Authorization: Bearer $OPENAI_API_KEY" \\',
            "      -H 'Content-Type: application/json' \\",
            f'      -d \'{{"model": "{first_model}", "messages": [{{"role": "user", "content": "hi"}}]}}\'',
            "",
        ]
    print("\n".join(lines), flush=True)


def _token(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    issuer = DevIssuer(config)
    print(
        issuer.mint(
            args.sub,
            kind=args.kind,
            tenant=args.tenant,
            actors=tuple(args.act),
            groups=tuple(args.group),
            task=args.task,
            ttl=args.ttl,
        )
    )
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.config_command == "schema":
        sys.stdout.write(orjson.dumps(config_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    from idgate.app import policy_store

    path = Path(args.file)
    config = load_config(path, env={"IDGATE_HOME": os.environ.get("IDGATE_HOME", ".idgate")})
    revision = policy_store(config).revision  # the policies validate against the schema too
    print(f"{path}: ok (policy revision {revision})")
    return 0


def _policy(args: argparse.Namespace) -> int:
    from idgate.policy.testing import load_policy_tests, run_policy_tests

    count = len(load_policy_tests(args.file).cases)
    mismatches = run_policy_tests(args.file)
    for mismatch in mismatches:
        print(f"FAIL {mismatch}")
    print(f"{args.file}: {count - len(mismatches)} passed, {len(mismatches)} failed")
    return 1 if mismatches else 0


def _audit_query(args: argparse.Namespace, config: Config) -> int:
    from idgate.audit.query import TABLE_HEADER, query, table_row
    from idgate.audit.trail import open_store

    try:
        records = query(
            open_store(config),
            subject=args.subject,
            agent=args.agent,
            tenant=args.tenant,
            task=args.task,
            model=args.model,
            tool=args.tool,
            decision=args.decision,
            since=args.since,
            until=args.until,
            limit=args.limit,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"idgate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for record in records:
            sys.stdout.write(orjson.dumps(record).decode() + "\n")
        return 0
    rows = [list(TABLE_HEADER), *map(table_row, records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]))
    return 0


def _audit_explain(args: argparse.Namespace, config: Config) -> int:
    from idgate.audit.query import UnknownRequest, explain
    from idgate.audit.trail import open_store

    try:
        print(explain(open_store(config), args.request_id))
    except (FileNotFoundError, UnknownRequest) as exc:
        print(f"idgate: {exc.args[0]}", file=sys.stderr)
        return 1
    return 0


def _audit(args: argparse.Namespace) -> int:
    import psycopg

    from idgate.audit.trail import open_store
    from idgate.audit.verify import verify
    from idgate.sts.keys import KEYS_FILE, SigningKeys

    config = load_config(args.config)
    if args.audit_command == "query":
        return _audit_query(args, config)
    if args.audit_command == "explain":
        return _audit_explain(args, config)
    keys_file = config.home / KEYS_FILE
    # Read the published keys only: verifying never creates a key.
    jwks = SigningKeys(keys_file).jwks() if keys_file.exists() else {"keys": []}
    try:
        report = verify(open_store(config), jwks)
    except (FileNotFoundError, psycopg.Error) as exc:
        print(f"idgate: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def _keys(args: argparse.Namespace) -> int:
    from idgate.sts.keys import SigningKeys

    config = load_config(args.config)
    keys = SigningKeys.open(config.home, config.sts.algorithm)
    kid = keys.rotate(keep=config.sts.previous_keys, algorithm=config.sts.algorithm)
    published = [key["kid"] for key in keys.jwks()["keys"]]
    print(f"new signing key `{kid}`; published: {', '.join(f'`{k}`' for k in published)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "token":
            return _token(args)
        if args.command == "policy":
            return _policy(args)
        if args.command == "audit":
            return _audit(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "mcp":
            return run_mcp(args)
        if args.command == "revoke":
            return run_revoke(args)
        return _config(args)
    except ConfigError as error:
        where = f"{getattr(args, 'file', None) or getattr(args, 'config', None) or 'config'}"
        for problem in error.problems:
            print(f"idgate: {where}: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
