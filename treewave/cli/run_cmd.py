"""`treewave run`: the whole cluster as local processes on 127.0.0.1, supervised.

The options and the entry point; the supervisor is `treewave.local` (the plan of ports,
peers and arguments, the children and their stopping, readiness, restarts with backoff,
SIGHUP reloads and the drain of removed servers, the run directory)."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from pathlib import Path

from treewave.cli import argtypes
from treewave.cli.argtypes import non_negative_float, positive_float
from treewave.cli.errors import CommandError, ConfigError
from treewave.cli.settings import (
    LOG_LEVEL,
    POLICY,
    REBALANCE_INTERVAL,
    STATUS_INTERVAL,
    TOKEN_FOR_READS,
    TOPOLOGY,
    WAVE_TIMEOUT,
    add_options,
)
from treewave.core.topology import TopologyError
from treewave.local.errors import LocalRunError
from treewave.local.rundir import make_run_dir, sweep_stale_run_dirs
from treewave.local.supervisor import DEFAULT_PORT, Supervisor
from treewave.wire.topology_file import load_topology

__all__ = ["register", "run"]

DEFAULT_BASE_PORT = 8000

EXAMPLE = """\
examples:
  treewave run                                   # topology.json, balancer on :7999
  treewave run --topology big.json --port 9000 --base-port 9100
  treewave run --state-dir run-state --rebalance-interval 0   # keep queues, no auto-balance

Stop with Ctrl-C (or SIGTERM): every server and the balancer stop with it.
Change the topology live: edit the file, then `kill -HUP PID` (the pid is printed at start)
or `treewave apply --local --topology FILE`.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the whole cluster as local processes (no Docker)",
        description=textwrap.fill(
            "Start every server of the topology and the balancer as local processes "
            "on 127.0.0.1, wait until they are healthy, print the URLs and supervise them: a "
            "child that dies is restarted; Ctrl-C or SIGTERM stops them all.",
            88,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    add_options(p, TOPOLOGY)
    p.add_argument(
        "--port",
        type=argtypes.port,
        default=DEFAULT_PORT,
        metavar="PORT",
        help=f"balancer port: API, status page, metrics (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "--base-port",
        type=argtypes.port,
        default=DEFAULT_BASE_PORT,
        metavar="PORT",
        help="first server port; servers take consecutive free ports from here "
        f"(default: {DEFAULT_BASE_PORT})",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where servers keep their queues across restarts (default: a temporary "
        "directory removed on exit)",
    )
    add_options(p, REBALANCE_INTERVAL, WAVE_TIMEOUT, POLICY, STATUS_INTERVAL)
    add_options(
        p,
        TOKEN_FOR_READS.with_default(
            False,
            "the balancer requires an API token for reads too (the status page asks for it): "
            "a fresh one per run, in the run directory (its path is printed when ready)",
        ),
    )
    p.add_argument(
        "--ready-timeout",
        type=positive_float,
        default=60.0,
        metavar="S",
        help="give up if the cluster is not ready after this many seconds (default: 60)",
    )
    p.add_argument(
        "--grace",
        type=non_negative_float,
        default=5.0,
        metavar="S",
        help="seconds a child gets to stop after SIGTERM before SIGKILL (default: 5)",
    )
    add_options(
        p,
        LOG_LEVEL.with_default(
            "INFO", "log level of the children (their logs go to files in the run directory)"
        ),
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    sweep_stale_run_dirs()
    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None
    run_dir = make_run_dir()
    try:
        supervisor = Supervisor(
            topology=topology,
            topology_path=args.topology.resolve(),
            port=args.port,
            base_port=args.base_port,
            run_dir=run_dir,
            state_dir=(args.state_dir.resolve() if args.state_dir else run_dir / "state"),
            rebalance_interval=args.rebalance_interval,
            wave_timeout=args.wave_timeout,
            policy=args.policy,
            status_interval=args.status_interval,
            ready_timeout=args.ready_timeout,
            grace=args.grace,
            log_level=args.log_level,
            token_for_reads=args.token_for_reads,
        )
        return supervisor.run()
    except LocalRunError as exc:
        raise CommandError(str(exc)) from None
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
