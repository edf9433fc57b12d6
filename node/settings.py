"""How one server process is configured: command-line arguments or TREEWAVE_* variables."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.secretfile import read_secret

DEFAULT_PEER_TEMPLATE = "ws://{name}:8000/ws"


@dataclass(frozen=True)
class NodeSettings:
    name: str
    topology: Path
    host: str = "127.0.0.1"
    port: int = 8000
    peer_url_template: str = DEFAULT_PEER_TEMPLATE
    peer_urls: dict[str, str] = field(default_factory=dict)
    """Explicit URLs by server name (local runs), overriding the template."""
    state_dir: Path | None = None
    """Where the queue is persisted so it survives a crash; None keeps it in memory."""
    secret: str = ""
    """Per-deployment secret that authenticates links; empty disables the check."""
    tick_s: float = 0.05
    crash_points: frozenset[str] = frozenset()
    """Fault injection for tests: `before:TYPE` / `after:TYPE` makes the process exit
    hard just before handling / just after handling (and persisting) a message of that
    type, before any reply is sent. Set with TREEWAVE_CRASH (comma-separated)."""
    flood_rate: float = 2000.0
    """Frames per second a link may send on average (bursts of twice that) before its
    frames are dropped and counted."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--name", default=env("TREEWAVE_NAME"), help="this server's name")
    p.add_argument(
        "--topology",
        type=Path,
        default=Path(env("TREEWAVE_TOPOLOGY", "topology.json")),
        help="topology file (default: topology.json)",
    )
    p.add_argument("--host", default=env("TREEWAVE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("TREEWAVE_PORT", "8000")))
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
    p.add_argument("--state-dir", type=Path, default=env("TREEWAVE_STATE_DIR"))


def from_arguments(args: argparse.Namespace) -> NodeSettings:
    if not args.name:
        raise ValueError("--name (or TREEWAVE_NAME) is required")
    peers: dict[str, str] = {}
    if args.peers:
        peers = json.loads(Path(args.peers).read_text(encoding="utf-8"))
    return NodeSettings(
        name=args.name,
        topology=args.topology,
        host=args.host,
        port=args.port,
        peer_url_template=args.peer_url_template,
        peer_urls=peers,
        state_dir=args.state_dir,
        secret=read_secret(args.secret_file) if args.secret_file else env_secret(),
        crash_points=frozenset(
            p.strip() for p in os.environ.get("TREEWAVE_CRASH", "").split(",") if p.strip()
        ),
    )


def env_secret() -> str:
    secret = os.environ.get("TREEWAVE_SECRET", "")
    if secret and len(secret) < 16:
        raise ValueError("TREEWAVE_SECRET is too short (need 16+ characters)")
    return secret
