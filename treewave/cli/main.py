"""The `treewave` console script: one entry point, one module per group of subcommands.

Each module in `COMMAND_MODULES` exposes `register(subparsers)`, adding its subcommands
with `set_defaults(handler=...)`; a handler returns the process exit code.
Exit codes: 0 success, 1 failure, 2 usage or configuration error (a bad flag, a bad
`TREEWAVE_*` value, a bad topology, peers or secret file: see `treewave.cli.settings`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from treewave.cli import (
    apply_cmd,
    client_cmd,
    deploy_cmd,
    experiment_cmd,
    run_cmd,
    secret_cmd,
    services_cmd,
    simulate_cmd,
    trace_cmd,
)
from treewave.cli.errors import CommandError, ConfigError
from treewave.cli.settings import SettingError, resolve

__all__ = ["CommandError", "ConfigError", "build_parser", "main"]

COMMAND_MODULES = (
    simulate_cmd,
    secret_cmd,
    deploy_cmd,
    services_cmd,
    run_cmd,
    apply_cmd,
    client_cmd,
    trace_cmd,
    experiment_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treewave",
        description="Topology-aware load balancing of a server tree with Echo and Finn waves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  treewave run            # the whole cluster as local processes\n"
        "  treewave status         # the tree with each server's load",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
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
        resolve(args)
        code: int = handler(args)
    except (SettingError, ConfigError) as exc:
        print(f"treewave {args.command}: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"treewave {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
