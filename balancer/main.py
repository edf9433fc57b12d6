"""Run the balancer: `treewave balancer ...` (also the container's command)."""

from __future__ import annotations

import argparse
import sys

from aiohttp import web

from balancer.app import create_app
from balancer.settings import add_arguments, from_arguments
from wire.service import serve_app


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="treewave balancer")
    add_arguments(p)
    return p


def serve(args: argparse.Namespace) -> int:
    def make_app() -> tuple[web.Application, str, int]:
        settings = from_arguments(args)
        return create_app(settings), settings.host, settings.port

    return serve_app("treewave balancer", args, make_app)


def main(argv: list[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
