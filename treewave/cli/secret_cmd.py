"""`treewave secret`: make the per-deployment secrets (compose runs it once): the link
secret and the balancer's API token, each a file of its own."""

from __future__ import annotations

import argparse
from pathlib import Path

from treewave.cli.errors import CommandError
from treewave.wire.secretfile import ensure_secret

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "secret",
        help="create per-deployment secret files (link secret, API token) if missing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a random secret to each FILE unless it already holds one (each "
        "file its own secret). Servers and the balancer read the link secret "
        "(--secret-file) to authenticate their links; the balancer reads the API token "
        "(--api-token-file) and clients send it (--token-file).",
        epilog="examples:\n  treewave secret --out .treewave/secret\n"
        "  treewave secret --out .treewave/secret --out .treewave/api-token",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        action="append",
        metavar="FILE",
        help="a secret file to create (repeat for several)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for path in args.out:
        try:
            made = ensure_secret(path)
        except (OSError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        print(f"{'created' if made else 'kept'} the secret in {path}")
    return 0
