"""How the balancer is configured: command-line arguments or TREEWAVE_* variables."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.secretfile import read_secret

DEFAULT_PEER_TEMPLATE = "ws://{name}:8000/ws"
DEFAULT_PORT = 7999


@dataclass(frozen=True)
class BalancerSettings:
    topology: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    peer_url_template: str = DEFAULT_PEER_TEMPLATE
    peer_urls: dict[str, str] = field(default_factory=dict)
    secret: str = ""
    rebalance_interval_s: float | None = None
    """Overrides the topology's setting; 0 turns periodic rebalancing off."""
    wave_timeout_s: float | None = None
    """Overrides the topology's setting: the deadline of every wave."""
    step_timeout_s: float = 2.0
    """How long one transfer step waits for its answer."""
    status_interval_s: float = 2.0
    """How often the status page gets a fresh snapshot (at least 1 s)."""
    tick_s: float = 0.02


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--topology",
        type=Path,
        default=Path(env("TREEWAVE_TOPOLOGY", "topology.json")),
        help="topology file (default: topology.json)",
    )
    p.add_argument("--host", default=env("TREEWAVE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("TREEWAVE_PORT", str(DEFAULT_PORT))))
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
    p.add_argument(
        "--rebalance-interval",
        type=float,
        default=_float_or_none(env("TREEWAVE_REBALANCE_S")),
        help="seconds between rebalancing rounds, 0 = off (default: the topology's setting)",
    )
    p.add_argument(
        "--wave-timeout",
        type=float,
        default=_float_or_none(env("TREEWAVE_WAVE_TIMEOUT_S")),
        help="wave deadline in seconds (default: the topology's setting)",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=float(env("TREEWAVE_STATUS_INTERVAL_S", "2")),
        help="seconds between live status updates, at least 1 (default: 2)",
    )


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text else None


def from_arguments(args: argparse.Namespace) -> BalancerSettings:
    peers: dict[str, str] = {}
    if args.peers:
        peers = json.loads(Path(args.peers).read_text(encoding="utf-8"))
    if args.status_interval < 1:
        raise ValueError("--status-interval must be at least 1 second")
    return BalancerSettings(
        topology=args.topology,
        host=args.host,
        port=args.port,
        peer_url_template=args.peer_url_template,
        peer_urls=peers,
        secret=read_secret(args.secret_file) if args.secret_file else env_secret(),
        rebalance_interval_s=args.rebalance_interval,
        wave_timeout_s=args.wave_timeout,
        status_interval_s=args.status_interval,
    )


def env_secret() -> str:
    secret = os.environ.get("TREEWAVE_SECRET", "")
    if secret and len(secret) < 16:
        raise ValueError("TREEWAVE_SECRET is too short (need 16+ characters)")
    return secret
