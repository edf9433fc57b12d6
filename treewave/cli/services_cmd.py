"""`treewave node` and `treewave balancer`: run one service in the foreground
(the container commands; `treewave run` starts them as child processes)."""

from __future__ import annotations

import argparse

from treewave.balancer import app as balancer_app
from treewave.balancer import settings as balancer_settings
from treewave.node import app as node_app
from treewave.node import settings as node_settings
from treewave.wire.service import serve_service


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "node",
        help="run one server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one server of the topology: its task queue, CPU slots, links and "
        "metrics. Settings also come from TREEWAVE_* variables.",
        epilog="example:\n  treewave node --name aurora --topology topology.json --port 8000 \\\n"
        "      --peer-url-template 'ws://127.0.0.1:8000/ws'",
    )
    node_settings.add_arguments(p)
    p.set_defaults(handler=serve_node)
    b = sub.add_parser(
        "balancer",
        help="run the balancer (API, status page, waves, rebalancing)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the balancer: it links to every server, runs Echo and Finn waves, "
        "rebalances queued tasks and serves the HTTP API and the status page.",
        epilog="example:\n  treewave balancer --topology topology.json --port 7999 \\\n"
        "      --peer-url-template 'ws://{name}:8000/ws'",
    )
    balancer_settings.add_arguments(b)
    b.set_defaults(handler=serve_balancer)


def serve_node(args: argparse.Namespace) -> int:
    return serve_service("treewave node", args, node_settings.from_arguments, node_app.create_app)


def serve_balancer(args: argparse.Namespace) -> int:
    return serve_service(
        "treewave balancer", args, balancer_settings.from_arguments, balancer_app.create_app
    )
