"""The plan of a local cluster: which port each service gets, the peers file, and the
arguments each `treewave` child runs with. A pure value built from the topology's names,
ports already chosen and the files' paths, so `treewave run` and the test and benchmark
launchers start their services the same way."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from treewave.core.topology import BALANCER

__all__ = [
    "ClusterFiles",
    "ClusterPlan",
    "LaunchOptions",
    "ServicePlan",
    "balancer_args",
    "node_args",
    "peer_urls",
    "peers_json",
    "plan_cluster",
]


@dataclass(frozen=True)
class ClusterFiles:
    """The files every service reads at start."""

    topology: Path
    peers: Path
    """Server name -> WebSocket URL (`ClusterPlan.peers_json`)."""
    secret: Path | None = None
    """The link secret; None: the services' default (environment, else none)."""


@dataclass(frozen=True)
class LaunchOptions:
    """How the services run; None leaves a setting to the service (flag > env > file)."""

    host: str = "127.0.0.1"
    state_dir: Path | None = None
    """Where the servers keep their queues (a restarted server gets its queue back)."""
    balancer_state_dir: Path | None = None
    """Where the balancer keeps the desired topology and a drain in progress."""
    log_level: str | None = None
    rebalance_interval: float | None = None
    wave_timeout: float | None = None
    policy: str | None = None
    status_interval: float | None = None
    reads_token_file: Path | None = None
    """The balancer requires this API token for reads too."""
    extra_args: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """More arguments per service name (`BALANCER` for the balancer); they go last."""


@dataclass(frozen=True)
class ServicePlan:
    name: str
    """A server's name, or `BALANCER`."""
    kind: Literal["node", "balancer"]
    port: int
    args: tuple[str, ...]
    """The `treewave` subcommand and its options (the interpreter is the launcher's)."""
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class ClusterPlan:
    services: tuple[ServicePlan, ...]
    """The servers in topology order, then the balancer."""
    peers: Mapping[str, str]

    @property
    def nodes(self) -> tuple[ServicePlan, ...]:
        return self.services[:-1]

    @property
    def balancer(self) -> ServicePlan:
        return self.services[-1]

    def service(self, name: str) -> ServicePlan:
        return next(s for s in self.services if s.name == name)

    def peers_json(self) -> str:
        return peers_json(self.peers)


def peer_urls(ports: Mapping[str, int], host: str = "127.0.0.1") -> dict[str, str]:
    """Each server's WebSocket URL, as the peers file lists them."""
    return {name: f"ws://{host}:{port}/ws" for name, port in ports.items()}


def peers_json(peers: Mapping[str, str]) -> str:
    """The peers file's text."""
    return json.dumps(dict(peers), indent=2) + "\n"


def _common(files: ClusterFiles, options: LaunchOptions) -> list[str]:
    args = ["--topology", str(files.topology), "--host", options.host]
    args += ["--peers", str(files.peers)]
    if files.secret is not None:
        args += ["--secret-file", str(files.secret)]
    if options.log_level is not None:
        args += ["--log-level", options.log_level]
    return args


def node_args(name: str, port: int, files: ClusterFiles, options: LaunchOptions) -> tuple[str, ...]:
    args = ["node", "--name", name, "--port", str(port), *_common(files, options)]
    if options.state_dir is not None:
        args += ["--state-dir", str(options.state_dir)]
    return (*args, *options.extra_args.get(name, ()))


def balancer_args(port: int, files: ClusterFiles, options: LaunchOptions) -> tuple[str, ...]:
    args = ["balancer", "--port", str(port), *_common(files, options)]
    if options.balancer_state_dir is not None:
        args += ["--state-dir", str(options.balancer_state_dir)]
    for flag, value in (
        ("--rebalance-interval", options.rebalance_interval),
        ("--wave-timeout", options.wave_timeout),
        ("--policy", options.policy),
        ("--status-interval", options.status_interval),
    ):
        if value is not None:
            args += [flag, str(value)]
    if options.reads_token_file is not None:
        args += ["--token-for-reads", "--api-token-file", str(options.reads_token_file)]
    return (*args, *options.extra_args.get(BALANCER, ()))


def plan_cluster(
    names: Sequence[str],
    ports: Mapping[str, int],
    balancer_port: int,
    files: ClusterFiles,
    options: LaunchOptions | None = None,
) -> ClusterPlan:
    """Every server of `names` on its port in `ports`, and the balancer on `balancer_port`."""
    options = options or LaunchOptions()
    missing = [n for n in names if n not in ports]
    if missing:
        raise ValueError(f"no port for {', '.join(missing)}")
    nodes = [
        ServicePlan(n, "node", ports[n], node_args(n, ports[n], files, options), options.host)
        for n in names
    ]
    balancer = ServicePlan(
        BALANCER,
        "balancer",
        balancer_port,
        balancer_args(balancer_port, files, options),
        options.host,
    )
    return ClusterPlan((*nodes, balancer), peer_urls({n: ports[n] for n in names}, options.host))
