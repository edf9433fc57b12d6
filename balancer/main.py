"""Run the balancer: `treewave balancer ...` (also the container's command)."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from balancer.app import create_app
from balancer.settings import add_arguments, from_arguments
from core.topology import TopologyError


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="treewave balancer")
    add_arguments(p)
    p.add_argument("--log-level", default="INFO")
    return p


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = from_arguments(args)
        app = create_app(settings)
    except (TopologyError, ValueError, OSError) as exc:
        print(f"treewave balancer: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
