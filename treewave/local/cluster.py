"""The processes of one local run and the files they start from: every server and the
balancer as a `Child`, the peers file, and a snapshot of the topology per generation (a
child restarts from the snapshot it belongs to, so a crash brings it back as it was)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from treewave.core.topology import Topology
from treewave.local.children import (
    Child,
    child_command,
    death_signal_preexec,
    stop_children,
)
from treewave.local.console import Console
from treewave.local.plan import (
    ClusterFiles,
    LaunchOptions,
    ServicePlan,
    balancer_args,
    node_args,
    peer_urls,
    peers_json,
    plan_cluster,
)
from treewave.local.ports import allocate_ports
from treewave.wire.atomicfile import write_atomic

__all__ = ["LocalCluster"]


@dataclass
class LocalCluster:
    """The children of a run (the servers in order, the balancer last)."""

    topology: Topology
    """The topology the children run (the last one the balancer adopted)."""
    run_dir: Path
    balancer_port: int
    base_port: int
    options: LaunchOptions
    grace: float
    console: Console
    children: list[Child] = field(default_factory=list)
    peers: dict[str, str] = field(default_factory=dict)
    """Every server's URL, removed ones included while they drain (the balancer still
    talks to them)."""
    generation: int = 0

    def __post_init__(self) -> None:
        # Looked up once, before any fork (see `children`).
        self.preexec = death_signal_preexec()

    # files

    @property
    def peers_file(self) -> Path:
        return self.run_dir / "peers.json"

    @property
    def secret_file(self) -> Path:
        return self.run_dir / "secret"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def files(self, snapshot: Path) -> ClusterFiles:
        return ClusterFiles(topology=snapshot, peers=self.peers_file, secret=self.secret_file)

    def snapshot(self, topology: Topology) -> Path:
        """The topology of this generation, as a file its servers start (and restart) from."""
        path = self.run_dir / f"topology-{self.generation}.json"
        write_atomic(path, topology.dumps())
        return path

    def next_snapshot(self, topology: Topology) -> Path:
        self.generation += 1
        return self.snapshot(topology)

    def write_peers(self) -> None:
        write_atomic(self.peers_file, peers_json(self.peers))

    # the children

    def create(self) -> None:
        """Choose the servers' ports, write the peers file and make every child (none
        started yet)."""
        self.log_dir.mkdir(exist_ok=True)
        names = self.topology.names
        ports = allocate_ports(self.base_port, len(names), {self.balancer_port})
        plan = plan_cluster(
            names,
            dict(zip(names, ports, strict=True)),
            self.balancer_port,
            self.files(self.snapshot(self.topology)),
            self.options,
        )
        self.peers = dict(plan.peers)
        self.write_peers()
        self.children = [self.child(service) for service in plan.services]

    def child(self, service: ServicePlan) -> Child:
        log = self.log_dir / f"{service.name}.log"
        argv = [*child_command(), *service.args]
        return Child(service.name, service.kind, service.port, argv, log, self.options.host)

    @property
    def nodes(self) -> list[Child]:
        return [c for c in self.children if c.kind == "node"]

    @property
    def balancer(self) -> Child:
        return self.children[-1]

    def node(self, name: str) -> Child:
        for child in self.nodes:
            if child.name == name:
                return child
        raise KeyError(name)

    def start(self, child: Child) -> None:
        child.start(self.preexec)  # safe: one thread, see `children`

    def add_servers(self, names: list[str], snapshot: Path) -> list[Child]:
        """Start new servers on free ports, from `snapshot`; the peers file lists them
        before they start."""
        used = {self.balancer_port, *(c.port for c in self.children)}
        ports = allocate_ports(self.base_port, len(names), used)
        self.peers.update(peer_urls(dict(zip(names, ports, strict=True)), self.options.host))
        self.write_peers()
        started = []
        for name, port in zip(names, ports, strict=True):
            args = node_args(name, port, self.files(snapshot), self.options)
            child = self.child(ServicePlan(name, "node", port, args, self.options.host))
            self.children.insert(len(self.children) - 1, child)  # the balancer stays last
            self.start(child)
            child.recovering = True
            started.append(child)
            self.console.say(f"server {name} started (port {port}, pid {child.pid})")
        return started

    def restart_with(self, name: str, snapshot: Path) -> None:
        """Stop one server and start it again from `snapshot` (same port, same state
        directory: its queue survives)."""
        child = self.node(name)
        child.argv = [
            *child_command(),
            *node_args(name, child.port, self.files(snapshot), self.options),
        ]
        child.stop(self.grace)
        self.start(child)
        child.recovering = True
        self.console.say(f"server {name} restarted with its new view (pid {child.pid})")

    def balancer_from(self, snapshot: Path) -> None:
        """The balancer restarts (if it dies) from `snapshot`: the topology it adopted."""
        args = balancer_args(self.balancer_port, self.files(snapshot), self.options)
        self.balancer.argv = [*child_command(), *args]

    def remove(self, names: Iterable[str]) -> None:
        """Stop these servers for good: out of the peers file, their state deleted."""
        for name in names:
            child = self.node(name)
            child.stop(self.grace)
            self.children.remove(child)
            self.peers.pop(name, None)
            self.delete_state(name)
        self.write_peers()

    def delete_state(self, name: str) -> None:
        state_dir = self.options.state_dir
        if state_dir is None:
            return
        # The server's task store (node.store: SQLite and its WAL files) and a JSON state
        # file of earlier releases, imported or not.
        suffixes = (".sqlite3", ".sqlite3-wal", ".sqlite3-shm", ".json", ".json.imported")
        for suffix in (*suffixes, ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                (state_dir / f"{name}{suffix}").unlink()

    def stop_all(self, why: str, hurry: Callable[[], bool]) -> None:
        """Stop every child (SIGKILL after the grace period, or as soon as `hurry()`) and
        reap them all."""
        live = [c for c in self.children if c.alive()]
        if live:
            self.console.say(f"stopping {len(live)} processes ({why})...")

        def killing(child: Child) -> None:
            self.console.warn(f"{child.label} did not stop in time; killing it")

        stop_children(self.children, self.grace, hurry, killing)
        if live:
            self.console.say("stopped")
