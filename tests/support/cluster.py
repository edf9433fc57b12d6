"""A treewave cluster as real, separate processes on loopback.

`ClusterPool.start(topology)` writes the topology and a peers file into a directory,
starts `python -m treewave.cli.main node ...` for every server and `... balancer` for the
balancer, each on a free 127.0.0.1 port, and waits (by polling, never by sleeping a fixed
time) until every service answers `/healthz`, every server reports all its links up and
the balancer has a link to every server. Some services can be held back (`hold=`) and
started later with `Cluster.release()`. Options give every server a state directory,
the balancer a wave deadline, any service its own environment (crash points).

Stopping always stops every process it started with SIGTERM (SIGKILL after a grace
period), waits for each one so no zombie is left, and reports one that had to be killed
or died on its own. The pytest fixtures over it are in tests/integration/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.commands import REPO, clean_env
from tests.support.http import get_json
from tests.support.ports import free_ports
from treewave.core.topology import BALANCER
from treewave.local.children import death_signal_preexec
from treewave.local.plan import ClusterFiles, LaunchOptions, plan_cluster

__all__ = [
    "BALANCER",
    "Cluster",
    "ClusterError",
    "ClusterOptions",
    "ClusterPool",
    "Service",
    "StartCluster",
    "build_cluster",
    "parent_child_edges",
    "server_names",
]

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
START_ATTEMPTS = 3


def parent_child_edges(topology: dict[str, Any]) -> set[tuple[str, str]]:
    return {(s["name"], c) for s in topology["servers"] for c in s.get("children", [])}


def server_names(topology: dict[str, Any]) -> list[str]:
    return [s["name"] for s in topology["servers"]]


class ClusterError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    port: int
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment (e.g. TREEWAVE_CRASH); nothing else TREEWAVE_* is inherited."""
    tied: bool = False
    """Die with the launching process (benchmarks: a killed run leaves nothing behind)."""
    proc: subprocess.Popen[bytes] | None = None
    killed: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, cwd: Path = REPO) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"----- start {self.args[0]} env={self.env} -----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "treewave.cli.main", *self.args],
                cwd=cwd,
                env=clean_env(**self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=death_signal_preexec() if self.tied else None,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap: a crash, as far as the service can tell."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, wait; SIGKILL if it does not stop in time. Always reaps the child."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait()
        else:
            self.proc.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"


@dataclass
class Cluster:
    topology: dict[str, Any]
    directory: Path
    services: dict[str, Service] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    stopped_on_purpose: set[str] = field(default_factory=set)

    # --- addresses -------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return server_names(self.topology)

    @property
    def edges(self) -> set[tuple[str, str]]:
        return parent_child_edges(self.topology)

    @property
    def balancer_url(self) -> str:
        return self.services[BALANCER].url

    def url(self, name: str) -> str:
        return self.services[name].url

    def ws_url(self, name: str) -> str:
        return f"ws://127.0.0.1:{self.services[name].port}/ws"

    @property
    def node_urls(self) -> dict[str, str]:
        return {n: self.services[n].url for n in self.names}

    def parents(self, name: str) -> list[str]:
        return [s["name"] for s in self.topology["servers"] if name in s.get("children", [])]

    def children(self, name: str) -> list[str]:
        spec = next(s for s in self.topology["servers"] if s["name"] == name)
        return list(spec.get("children", []))

    @property
    def leaves(self) -> list[str]:
        return [s["name"] for s in self.topology["servers"] if not s.get("children")]

    @property
    def root(self) -> str:
        kids = {c for s in self.topology["servers"] for c in s.get("children", [])}
        return next(n for n in self.names if n not in kids)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, names: set[str]) -> None:
        for name in sorted(names, key=lambda n: n != BALANCER):  # servers first
            self.services[name].start()

    def release(self, wait: bool = True) -> None:
        """Start the held-back services and (with `wait`) wait until the whole cluster is
        linked."""
        held, self.held = self.held, set()
        self.start(held)
        if wait:
            self.wait_ready()

    def running(self) -> list[str]:
        return [n for n in self.services if n not in self.held]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll until every running service is healthy and all their links are up."""
        deadline = time.monotonic() + timeout
        last = "nothing polled yet"
        while True:
            for name in self.running():
                if not self.services[name].alive():
                    raise ClusterError(f"{name} exited during start-up")
            problem = self._not_ready()
            if problem is None:
                return
            last = problem
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster not ready after {timeout:.0f} s: {last}")
            time.sleep(0.1)

    def _not_ready(self) -> str | None:
        up = set(self.running())
        for name in sorted(up):
            try:
                health = get_json(self.services[name].url + "/healthz", timeout=2)
            except (OSError, ValueError) as exc:
                return f"{name} /healthz: {exc}"
            if name == BALANCER:
                if BALANCER in self.held:
                    continue
                expected = len([n for n in self.names if n in up])
                if health.get("links_up") != expected:
                    return f"balancer links_up={health.get('links_up')} of {expected}"
                continue
            state = get_json(self.services[name].url + "/api/state", timeout=2)
            down = [peer for peer, ok in state["links"].items() if peer in up and not ok]
            if down:
                return f"{name} has no link to {down}"
        return None

    def healthy(self, name: str) -> bool:
        try:
            return bool(get_json(self.url(name) + "/healthz", timeout=5).get("status") == "ok")
        except (OSError, ValueError):
            return False

    def stop_server(self, name: str) -> None:
        """Stop one service for good (a lost server): SIGTERM, reaped; teardown expects it
        to be down."""
        self.stopped_on_purpose.add(name)
        self.services[name].stop()

    def pause(self, name: str) -> None:
        proc = self.services[name].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        proc = self.services[name].proc
        assert proc is not None
        proc.send_signal(signal.SIGCONT)

    def stop_all(self) -> list[str]:
        """Stop everything (resuming anything paused); returns problems seen."""
        problems = []
        for svc in self.services.values():
            if svc.proc is not None and svc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    svc.proc.send_signal(signal.SIGCONT)
        for name, svc in self.services.items():
            was_alive = svc.alive()
            if svc.proc is not None and not was_alive and name not in self.stopped_on_purpose:
                problems.append(f"{name} died on its own (exit code {svc.proc.returncode})")
            svc.stop()
            if svc.killed:
                problems.append(f"{name} ignored SIGTERM for {STOP_GRACE_S:.0f} s (killed)")
            if svc.proc is not None:
                assert svc.proc.returncode is not None  # reaped: no zombie
        return problems

    def logs(self) -> str:
        parts = []
        for name, svc in self.services.items():
            parts.append(f"===== {name} ({svc.url}) =====\n{svc.log_text()}")
        return "\n".join(parts)


@dataclass(frozen=True)
class ClusterOptions:
    """How the services of a cluster are started."""

    hold: frozenset[str] = frozenset()
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    """More arguments per service name (BALANCER for the balancer)."""
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Extra environment per service name."""
    state_dir: bool = False
    """Every server keeps its queue in `DIRECTORY/state` (a restart gets it back)."""
    wave_timeout_s: float | None = None
    rebalance_interval_s: float = 0.0
    status_interval_s: float | None = None
    tied: bool = False
    ready_timeout_s: float = READY_TIMEOUT_S


def build_cluster(
    topology: dict[str, Any],
    directory: Path,
    options: ClusterOptions | None = None,
    cluster_class: type[Cluster] = Cluster,
    service_class: type[Service] = Service,
) -> Cluster:
    """Write the files and make the (not yet started) services of a cluster, as
    `treewave run` plans them (`treewave.local.plan`), on free ephemeral ports."""
    options = options or ClusterOptions()
    directory.mkdir(parents=True, exist_ok=True)
    names = server_names(topology)
    *node_ports, balancer_port = free_ports(len(names) + 1)
    files = ClusterFiles(topology=directory / "topology.json", peers=directory / "peers.json")
    launch = LaunchOptions(
        state_dir=directory / "state" if options.state_dir else None,
        rebalance_interval=options.rebalance_interval_s,
        wave_timeout=options.wave_timeout_s,
        status_interval=options.status_interval_s,
        extra_args=options.extra_args,
    )
    plan = plan_cluster(
        names, dict(zip(names, node_ports, strict=True)), balancer_port, files, launch
    )
    files.topology.write_text(json.dumps(topology, indent=2), encoding="utf-8")
    files.peers.write_text(plan.peers_json(), encoding="utf-8")
    cluster = cluster_class(topology=topology, directory=directory, held=set(options.hold))
    for planned in plan.services:
        cluster.services[planned.name] = service_class(
            planned.name,
            planned.port,
            list(planned.args),
            directory / f"{planned.name}.log",
            env=dict(options.env.get(planned.name, {})),
            tied=options.tied,
        )
    return cluster


class ClusterPool:
    """Starts clusters under `base` and stops every one of them at `close()`."""

    def __init__(self, base: Path, cluster_class: type[Cluster] = Cluster) -> None:
        self.base = base
        self.cluster_class = cluster_class
        self.clusters: list[Cluster] = []
        self.count = 0

    def start(
        self,
        topology: dict[str, Any],
        hold: Iterable[str] = (),
        extra_args: dict[str, list[str]] | None = None,
        **options: Any,
    ) -> Cluster:
        """Start a cluster and wait until it is ready (new ports on a failed attempt);
        `options` are `ClusterOptions` fields."""
        opts = ClusterOptions(hold=frozenset(hold), extra_args=extra_args or {}, **options)
        last: Exception | None = None
        self.count += 1
        for attempt in range(START_ATTEMPTS):
            directory = self.base / f"cluster{self.count}-try{attempt}"
            cluster = build_cluster(topology, directory, opts, self.cluster_class)
            self.clusters.append(cluster)
            cluster.start(set(cluster.services) - cluster.held)
            try:
                cluster.wait_ready(opts.ready_timeout_s)
            except ClusterError as exc:
                # Most likely a port taken between choosing and binding it: try new ports.
                last = exc
                print(f"cluster start attempt {attempt + 1} failed: {exc}\n{cluster.logs()}")
                cluster.stop_all()
                self.clusters.remove(cluster)
                continue
            return cluster
        raise ClusterError(f"could not start the cluster: {last}")

    def close(self, print_logs: bool) -> None:
        """Stop and reap everything; print the logs if asked or if stopping went wrong."""
        problems: list[str] = []
        for cluster in self.clusters:
            problems += cluster.stop_all()
        if print_logs or problems:
            for cluster in self.clusters:
                print(cluster.logs())
        self.clusters.clear()
        assert not problems, "; ".join(problems)


StartCluster = Callable[..., Cluster]
"""What the `start_cluster` fixtures give a test: `ClusterPool.start`."""
