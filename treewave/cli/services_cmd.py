"""`treewave node` and `treewave balancer`: run one service in the foreground (the
container commands; `treewave run` starts them as child processes).

Here the services' settings are read (flags and TREEWAVE_* variables through
`treewave.cli.settings`, the peers and secret files) and the aiohttp app is served until
SIGINT/SIGTERM. The service packages only receive the finished settings object.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from treewave.balancer.access import access_settings
from treewave.balancer.settings import DEFAULT_PORT as BALANCER_PORT
from treewave.balancer.settings import BalancerSettings
from treewave.cli import settings as opts
from treewave.cli.errors import ConfigError
from treewave.core.topology import TopologyError
from treewave.node.settings import NodeSettings
from treewave.wire.secretfile import read_secret

__all__ = ["balancer_settings", "node_settings", "register"]

NODE_PORT = 8000
MIN_SECRET_CHARS = 16

LINK_OPTIONS = (
    opts.TOPOLOGY,
    opts.HOST,
    opts.PEER_URL_TEMPLATE,
    opts.PEERS,
    opts.SECRET_FILE,
    opts.LOG_LEVEL,
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "node",
        help="run one server of the topology (the node role)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one server of the topology: its task queue, CPU slots, links and "
        "metrics. Each setting is the flag, else its TREEWAVE_* variable, else the default.",
        epilog="example:\n  treewave node --name aurora --topology topology.json --port 8000 \\\n"
        "      --peer-url-template 'ws://127.0.0.1:8000/ws'",
    )
    opts.add_options(
        p,
        opts.NAME,
        *LINK_OPTIONS,
        opts.PORT.with_default(NODE_PORT),
        opts.STATE_DIR,
        opts.TRACE_WAVES,
        opts.TRACE_PUSH,
    )
    p.set_defaults(handler=serve_node)
    b = sub.add_parser(
        "balancer",
        help="run the balancer (API, status page, waves, rebalancing)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the balancer: it links to every server, runs Echo and Finn waves, "
        "rebalances queued tasks and serves the HTTP API and the status page. Each setting "
        "is the flag, else its TREEWAVE_* variable, else the topology file's setting (wave "
        "timeout, rebalance interval, policy), else the default.",
        epilog="example:\n  treewave balancer --topology topology.json --port 7999 \\\n"
        "      --peer-url-template 'ws://{name}:8000/ws'",
    )
    opts.add_options(
        b,
        *LINK_OPTIONS,
        opts.PORT.with_default(BALANCER_PORT),
        opts.REBALANCE_INTERVAL,
        opts.WAVE_TIMEOUT,
        opts.POLICY,
        opts.STATUS_INTERVAL,
        opts.TRACE_HISTORY,
        opts.TRACE_SAMPLE,
        opts.BALANCER_STATE_DIR,
    )
    opts.add_options(b, *opts.ACCESS_OPTIONS, title="access (who may change the cluster)")
    b.set_defaults(handler=serve_balancer)


# --- settings -------------------------------------------------------------------------------


def read_peers(path: Path | None) -> dict[str, str]:
    """The peers file (server name -> WebSocket URL), or {} without one."""
    if path is None:
        return {}
    try:
        peers = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the peers file {path} (--peers): {exc}") from None
    if not isinstance(peers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in peers.items()
    ):
        raise ConfigError(f"the peers file {path} (--peers) must map server names to URLs")
    return peers


def read_link_secret(secret_file: Path | None) -> str:
    """The link secret: from `--secret-file`, else TREEWAVE_SECRET, else none ("")."""
    if secret_file is not None:
        try:
            return read_secret(secret_file)
        except ValueError as exc:
            raise ConfigError(f"{exc} (--secret-file)") from None
    secret = os.environ.get("TREEWAVE_SECRET", "")
    if secret and len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"TREEWAVE_SECRET (environment): too short (need {MIN_SECRET_CHARS}+ characters)"
        )
    return secret


def crash_points() -> frozenset[str]:
    """Fault injection for tests: TREEWAVE_CRASH, comma-separated `before:TYPE` /
    `after:TYPE` (see NodeSettings.crash_points)."""
    text = os.environ.get("TREEWAVE_CRASH", "")
    return frozenset(p.strip() for p in text.split(",") if p.strip())


def node_settings(args: argparse.Namespace) -> NodeSettings:
    if not args.name:
        raise ConfigError("--name (or TREEWAVE_NAME) is required")
    return NodeSettings(
        name=args.name,
        topology=args.topology,
        host=args.host,
        port=args.port,
        peer_url_template=args.peer_url_template,
        peer_urls=read_peers(args.peers),
        state_dir=args.state_dir,
        secret=read_link_secret(args.secret_file),
        trace_waves=args.trace_waves,
        trace_push_s=args.trace_push,
        crash_points=crash_points(),
    )


def balancer_settings(args: argparse.Namespace) -> BalancerSettings:
    return BalancerSettings(
        topology=args.topology,
        host=args.host,
        port=args.port,
        peer_url_template=args.peer_url_template,
        peer_urls=read_peers(args.peers),
        secret=read_link_secret(args.secret_file),
        rebalance_interval_s=args.rebalance_interval,
        wave_timeout_s=args.wave_timeout,
        policy=args.policy,
        status_interval_s=args.status_interval,
        trace_history=args.trace_history,
        trace_sample=args.trace_sample,
        state_dir=args.state_dir,
        peers_file=args.peers,
        access=access_settings(args, args.host),
    )


# --- serving --------------------------------------------------------------------------------

S = TypeVar("S", NodeSettings, BalancerSettings)


def serve(
    args: argparse.Namespace,
    make_settings: Callable[[argparse.Namespace], S],
    create_app: Callable[[S], web.Application],
) -> int:
    """Build the service's settings and app (a bad configuration is a `ConfigError`,
    exit 2) and serve it until SIGINT/SIGTERM, running its cleanup."""
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = make_settings(args)
        app = create_app(settings)
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    settle_heap()
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    return 0


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between two young collections (CPython's default: 700)."""


def settle_heap() -> None:
    """Once the app is built: move everything allocated so far (modules, pydantic's
    schemas, the topology) out of the collector's sight (`gc.freeze`), and collect the
    young generation less often. A service allocates many short-lived objects per frame
    (parsed messages, trace parts); with the defaults, collections that walk the
    long-lived heap took about half of the balancer's time parsing a traced wave's parts
    (bench/README.md, "Issue 24, closing part")."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


# Each service's app is imported by its own command only: a server container imports
# neither the balancer's domain nor its page (a 300-server stack starts 300 interpreters).


def serve_node(args: argparse.Namespace) -> int:
    from treewave.node import app as node_app

    return serve(args, node_settings, node_app.create_app)


def serve_balancer(args: argparse.Namespace) -> int:
    from treewave.balancer import app as balancer_app

    return serve(args, balancer_settings, balancer_app.create_app)
