"""How the balancer is configured: command-line arguments or TREEWAVE_* variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from treewave.balancer.access import AccessSettings, access_settings, add_access_arguments
from treewave.wire.service import DEFAULT_PEER_TEMPLATE, add_link_arguments, link_settings

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
    trace_history: int = 50
    """How many traced waves the balancer keeps (bounded memory); 0 turns tracing off."""
    trace_sample: float = 0.1
    """The share of periodic rebalancing waves that are traced (API waves always are)."""
    access: AccessSettings = field(default_factory=AccessSettings)
    """Host, Origin, Content-Type and API-token rules of the HTTP API (balancer/access.py)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    add_link_arguments(p, default_port=DEFAULT_PORT)
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
    p.add_argument(
        "--trace-history",
        type=int,
        default=int(env("TREEWAVE_TRACE_HISTORY", "50")),
        help="traced waves kept for /api/waves, 0 = no tracing (default: 50)",
    )
    p.add_argument(
        "--trace-sample",
        type=float,
        default=float(env("TREEWAVE_TRACE_SAMPLE", "0.1")),
        help="share of periodic rebalancing waves traced, 0-1 (default: 0.1)",
    )
    add_access_arguments(p)


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text else None


def from_arguments(args: argparse.Namespace) -> BalancerSettings:
    if args.status_interval < 1:
        raise ValueError("--status-interval must be at least 1 second")
    if args.trace_history < 0:
        raise ValueError("--trace-history must be 0 or more")
    if not 0 <= args.trace_sample <= 1:
        raise ValueError("--trace-sample must be between 0 and 1")
    link = link_settings(args)
    return BalancerSettings(
        topology=link.topology,
        host=link.host,
        port=link.port,
        peer_url_template=link.peer_url_template,
        peer_urls=link.peer_urls,
        secret=link.secret,
        rebalance_interval_s=args.rebalance_interval,
        wave_timeout_s=args.wave_timeout,
        status_interval_s=args.status_interval,
        trace_history=args.trace_history,
        trace_sample=args.trace_sample,
        access=access_settings(args, link.host),
    )
