"""The `treewave` console script: one entry point, one module per group of subcommands.

Each module in `COMMAND_MODULES` exposes `register(subparsers)`, adding its subcommands
with `set_defaults(handler=...)`; a handler returns the process exit code.
Exit codes: 0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "cli.simulate_cmd",
    "cli.secret_cmd",
    "cli.deploy_cmd",
    "cli.services_cmd",
    "cli.run_cmd",
    "cli.client_cmd",
)


class CommandError(Exception):
    """A failure to report as one clear line (exit code 1)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treewave",
        description="Topology-aware load balancing of a server tree with Echo and Finn waves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  treewave run            # the whole cluster as local processes\n"
        "  treewave status         # the tree with each server's load",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        code: int = handler(args)
    except CommandError as exc:
        print(f"treewave {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    # Run the importable module's main, so `CommandError` raised by the command modules
    # (which import `cli.main`) is the class caught above, not a twin from `__main__`.
    from cli.main import main as _main

    sys.exit(_main())
