"""`idgate mcp pins` and `idgate mcp approve SERVER [TOOL]`: the tool pins, from the command line.

A tool withheld because its description or schema changed upstream (see
`pins.py`) comes back once someone who has read the new text approves it:
`approve` pins the hash last seen, and every worker sees it on its next listing.
"""

from __future__ import annotations

import argparse
from typing import Any

from idgate.config import load_config
from idgate.mcp.pins import PinStore

__all__ = ["add_commands", "run"]

_CONFIG_HELP = "YAML config file (default: $IDGATE_CONFIG, else the embedded default)"


def add_commands(commands: Any) -> None:
    """Add `mcp` and its subcommands to the CLI's subparsers."""
    mcp = commands.add_parser("mcp", help="the MCP gateway's tool pins")
    mcp_commands = mcp.add_subparsers(dest="mcp_command", required=True)
    pins = mcp_commands.add_parser("pins", help="list each tool's pinned hash, and the changed ones withheld")
    pins.add_argument("--config", help=_CONFIG_HELP)
    approve = mcp_commands.add_parser("approve", help="re-approve a changed tool (or all of a server's)")
    approve.add_argument("server", metavar="SERVER")
    approve.add_argument("tool", metavar="TOOL", nargs="?")
    approve.add_argument("--config", help=_CONFIG_HELP)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = PinStore(config.home)
    if args.mcp_command == "pins":
        listing = store.listing()
        if not listing:
            print("no tool is pinned yet")
        for server, tools in sorted(listing.items()):
            for name, pin in sorted(tools.items()):
                state = f"WITHHELD, changed to {pin['pending']}" if pin["pending"] else "approved"
                print(f"{server}/{name}: {pin['pinned']} ({state})")
        return 0
    approved = store.approve(args.server, args.tool)
    if not approved:
        what = f"`{args.server}/{args.tool}`" if args.tool else f"server `{args.server}`"
        print(f"idgate: nothing to approve: {what} has no changed tool")
        return 1
    for name in approved:
        print(f"approved `{args.server}/{name}`: its new description and schema are pinned")
    return 0
