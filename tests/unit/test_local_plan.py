"""The plan of a local cluster (ports, peers file, each child's arguments) is a pure value:
what `treewave run`, the test launchers and the browser tests start."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from treewave.cli.main import build_parser
from treewave.core.topology import BALANCER
from treewave.local.plan import ClusterFiles, LaunchOptions, plan_cluster
from treewave.local.supervisor import BACKOFF_FIRST_S, BACKOFF_MAX_S, restart_delay

FILES = ClusterFiles(topology=Path("run/topology-0.json"), peers=Path("run/peers.json"))
NAMES = ("alpha", "beta", "gamma")
PORTS = {"alpha": 8000, "beta": 8001, "gamma": 8003}


def parsed(args: tuple[str, ...]) -> argparse.Namespace:
    """The arguments as the real console script parses them (a plan must be runnable)."""
    return build_parser().parse_args(list(args))


def test_servers_in_order_then_the_balancer_with_their_ports_and_peers() -> None:
    plan = plan_cluster(NAMES, PORTS, 7999, FILES)
    assert [s.name for s in plan.services] == [*NAMES, BALANCER]
    assert [s.kind for s in plan.services] == ["node", "node", "node", "balancer"]
    assert plan.balancer.url == "http://127.0.0.1:7999"
    assert plan.service("gamma").port == 8003
    assert dict(plan.peers) == {n: f"ws://127.0.0.1:{p}/ws" for n, p in PORTS.items()}
    assert json.loads(plan.peers_json()) == dict(plan.peers)


def test_every_child_parses_as_the_service_it_is_meant_to_be() -> None:
    options = LaunchOptions(
        state_dir=Path("state"),
        balancer_state_dir=Path("state/balancer"),
        log_level="DEBUG",
        rebalance_interval=0.0,
        wave_timeout=7.5,
        status_interval=1.0,
    )
    files = ClusterFiles(FILES.topology, FILES.peers, secret=Path("run/secret"))
    plan = plan_cluster(NAMES, PORTS, 7999, files, options)
    for node in plan.nodes:
        args = parsed(node.args)
        assert args.command == "node"
        assert (args.name, args.port, args.host) == (node.name, node.port, "127.0.0.1")
        assert (args.topology, args.peers) == (FILES.topology, FILES.peers)
        assert args.secret_file == Path("run/secret")
        assert args.state_dir == Path("state")
        assert args.log_level == "DEBUG"
    args = parsed(plan.balancer.args)
    assert args.command == "balancer"
    assert args.port == 7999
    assert args.state_dir == Path("state/balancer")
    assert (args.rebalance_interval, args.wave_timeout, args.status_interval) == (0.0, 7.5, 1.0)


def test_unset_options_are_left_to_the_service() -> None:
    plan = plan_cluster(NAMES, PORTS, 7999, FILES)
    every = " ".join(a for s in plan.services for a in s.args)
    for flag in ("--state-dir", "--secret-file", "--log-level", "--wave-timeout"):
        assert flag not in every
    assert "--token-for-reads" not in plan.balancer.args


def test_extra_arguments_go_last_for_their_service_only() -> None:
    extra = {"beta": ("--log-level", "WARNING"), BALANCER: ("--require-token",)}
    plan = plan_cluster(NAMES, PORTS, 7999, FILES, LaunchOptions(extra_args=extra))
    assert plan.service("beta").args[-2:] == ("--log-level", "WARNING")
    assert "WARNING" not in plan.service("alpha").args
    assert plan.balancer.args[-1] == "--require-token"


def test_a_token_for_reads_is_passed_to_the_balancer() -> None:
    options = LaunchOptions(reads_token_file=Path("run/api-token"))
    args = plan_cluster(NAMES, PORTS, 7999, FILES, options).balancer.args
    assert args[-3:] == ("--token-for-reads", "--api-token-file", "run/api-token")


def test_a_server_without_a_port_is_refused() -> None:
    with pytest.raises(ValueError, match="no port for gamma"):
        plan_cluster(NAMES, {"alpha": 1, "beta": 2}, 7999, FILES)


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    delays = [restart_delay(n) for n in range(1, 10)]
    assert delays[:3] == [BACKOFF_FIRST_S, 2 * BACKOFF_FIRST_S, 4 * BACKOFF_FIRST_S]
    assert delays == sorted(delays)
    assert delays[-1] == BACKOFF_MAX_S
