"""How one server process is configured: command-line arguments or TREEWAVE_* variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from treewave.wire.service import DEFAULT_PEER_TEMPLATE, add_link_arguments, link_settings


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
    trace_waves: int = 64
    """How many recent waves this server keeps its part of the trace for (bounded
    memory; 0 records nothing). The balancer asks for a part after a traced wave."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=os.environ.get("TREEWAVE_NAME"), help="this server's name")
    add_link_arguments(p, default_port=8000)
    p.add_argument("--state-dir", type=Path, default=os.environ.get("TREEWAVE_STATE_DIR"))
    p.add_argument(
        "--trace-waves",
        type=int,
        default=int(os.environ.get("TREEWAVE_TRACE_WAVES", "64")),
        help="recent waves whose trace this server keeps, 0 = none (default: 64)",
    )


def from_arguments(args: argparse.Namespace) -> NodeSettings:
    if not args.name:
        raise ValueError("--name (or TREEWAVE_NAME) is required")
    if args.trace_waves < 0:
        raise ValueError("--trace-waves must be 0 or more")
    link = link_settings(args)
    return NodeSettings(
        name=args.name,
        topology=link.topology,
        host=link.host,
        port=link.port,
        peer_url_template=link.peer_url_template,
        peer_urls=link.peer_urls,
        state_dir=args.state_dir,
        secret=link.secret,
        trace_waves=args.trace_waves,
        crash_points=frozenset(
            p.strip() for p in os.environ.get("TREEWAVE_CRASH", "").split(",") if p.strip()
        ),
    )
