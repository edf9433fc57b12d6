"""What every treewave service process shares: the link arguments (topology, address,
peers, secret), reading them, and serving an aiohttp app in the foreground."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from aiohttp import web

from treewave.core.topology import TopologyError
from treewave.wire.secretfile import read_secret

DEFAULT_PEER_TEMPLATE = "ws://{name}:8000/ws"


@dataclass(frozen=True)
class LinkSettings:
    """The part of a service's settings that says where it and its peers are."""

    topology: Path
    host: str
    port: int
    peer_url_template: str
    peer_urls: dict[str, str]
    secret: str


def add_link_arguments(p: argparse.ArgumentParser, default_port: int) -> None:
    env = os.environ.get
    p.add_argument(
        "--topology",
        type=Path,
        default=Path(env("TREEWAVE_TOPOLOGY", "topology.json")),
        help="topology file (default: topology.json)",
    )
    p.add_argument("--host", default=env("TREEWAVE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("TREEWAVE_PORT", str(default_port))))
    p.add_argument(
        "--peer-url-template",
        default=env("TREEWAVE_PEER_URL_TEMPLATE", DEFAULT_PEER_TEMPLATE),
        help="WebSocket URL of a server, {name} replaced (default: %(default)s)",
    )
    p.add_argument(
        "--secret-file",
        type=Path,
        default=env("TREEWAVE_SECRET_FILE"),
        help="file holding the per-deployment link secret (else TREEWAVE_SECRET; "
        "neither: links are not authenticated)",
    )
    p.add_argument(
        "--peers",
        type=Path,
        default=env("TREEWAVE_PEERS"),
        help="JSON file mapping server names to WebSocket URLs (overrides the template)",
    )
    p.add_argument("--log-level", default=env("TREEWAVE_LOG_LEVEL", "INFO"))


def link_settings(args: argparse.Namespace) -> LinkSettings:
    """Read the link arguments; a bad peers or secret file is a ValueError saying so."""
    peers: dict[str, str] = {}
    if args.peers:
        try:
            peers = json.loads(Path(args.peers).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the peers file {args.peers}: {exc}") from None
        if not isinstance(peers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in peers.items()
        ):
            raise ValueError(f"the peers file {args.peers} must map server names to URLs")
    return LinkSettings(
        topology=args.topology,
        host=args.host,
        port=args.port,
        peer_url_template=args.peer_url_template,
        peer_urls=peers,
        secret=read_secret(args.secret_file) if args.secret_file else env_secret(),
    )


def env_secret() -> str:
    secret = os.environ.get("TREEWAVE_SECRET", "")
    if secret and len(secret) < 16:
        raise ValueError("TREEWAVE_SECRET is too short (need 16+ characters)")
    return secret


class ServiceSettings(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


S = TypeVar("S", bound=ServiceSettings)


def serve_service(
    prog: str,
    args: argparse.Namespace,
    from_arguments: Callable[[argparse.Namespace], S],
    create_app: Callable[[S], web.Application],
) -> int:
    """Read a service's settings, build its app (a bad configuration is one line and
    exit 2) and serve it until SIGINT/SIGTERM, running its cleanup."""
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = from_arguments(args)
        app = create_app(settings)
    except (TopologyError, ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    return 0
