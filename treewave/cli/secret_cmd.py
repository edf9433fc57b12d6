"""`treewave secret`: make the per-deployment link secret (compose runs it once)."""

from __future__ import annotations

import argparse
from pathlib import Path

from treewave.cli.errors import CommandError
from treewave.wire.secretfile import ensure_secret


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "secret",
        help="create the per-deployment link secret file if it does not exist",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a random secret to FILE unless it already holds one. Servers "
        "and the balancer read it (--secret-file) to authenticate their links.",
        epilog="example:\n  treewave secret --out .treewave/secret",
    )
    p.add_argument("--out", type=Path, required=True, help="the secret file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        made = ensure_secret(args.out)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(f"{'created' if made else 'kept'} the link secret in {args.out}")
    return 0
