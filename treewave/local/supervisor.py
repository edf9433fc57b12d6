"""The supervisor of a local run: starts every child of the plan, waits until the cluster
is ready (every server healthy, the balancer linked to all, an Echo wave complete),
restarts a child that dies with exponential backoff, reloads the topology on SIGHUP, and on
SIGINT or SIGTERM stops everything (a second signal skips the grace period).

It has exactly one thread and forks every child from it (see `children`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from treewave.core.deadlines import wave_deadline_s
from treewave.core.precedence import SettingOverrides, effective_settings
from treewave.core.topology import Topology
from treewave.local.children import Child, describe_exit, tail
from treewave.local.cluster import LocalCluster
from treewave.local.console import Console
from treewave.local.errors import LocalRunError
from treewave.local.plan import LaunchOptions
from treewave.local.ports import HOST, port_free
from treewave.local.reload import TopologyReload
from treewave.local.rundir import TOPOLOGY_PATH_FILE
from treewave.wire.secretfile import ensure_secret, read_secret

__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "DEFAULT_PORT",
    "STABLE_S",
    "START_ATTEMPTS",
    "Supervisor",
    "get_json",
    "restart_delay",
]

DEFAULT_PORT = 7999
LOOP_S = 0.1
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_S = 10.0
"""A child that ran at least this long before dying restarts after the shortest backoff."""
START_ATTEMPTS = 3
"""While starting, a child that dies this many times in a row (each within `STABLE_S`)
makes `treewave run` give up instead of retrying forever."""

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Loopback only: never through an HTTP proxy from the environment."""


def restart_delay(failures: int) -> float:
    """The backoff before restarting a child that died `failures` times in a row."""
    return min(BACKOFF_FIRST_S * 2.0 ** (failures - 1), BACKOFF_MAX_S)


def get_json(url: str, timeout: float, token: str = "") -> Any:
    """The JSON body of a 200 answer, or None on any failure; `token`, when given, is sent
    as the balancer's API token."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            if resp.status != 200:
                return None
            return json.loads(resp.read())
    except (OSError, ValueError, http.client.HTTPException):
        return None


@dataclass
class Supervisor:
    topology: Topology
    topology_path: Path
    port: int
    base_port: int
    run_dir: Path
    state_dir: Path
    rebalance_interval: float | None = None
    wave_timeout: float | None = None
    policy: str | None = None
    status_interval: float | None = None
    ready_timeout: float = 60.0
    grace: float = 5.0
    log_level: str = "INFO"
    token_for_reads: bool = False
    """The balancer requires its API token for reads too: a fresh token per run
    (`api_token_file`), sent with the supervisor's own requests."""
    api_token: str = ""
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    stop_signal: int | None = None
    force: bool = False
    reload_requested: bool = False

    def __post_init__(self) -> None:
        self.console = Console(self.out, self.err)
        self.cluster = LocalCluster(
            topology=self.topology,
            run_dir=self.run_dir,
            balancer_port=self.port,
            base_port=self.base_port,
            options=LaunchOptions(
                host=HOST,
                state_dir=self.state_dir,
                # Its own directory ("balancer" is no server's name): the desired topology
                # and a drain in progress survive its restart.
                balancer_state_dir=self.state_dir / "balancer",
                log_level=self.log_level,
                rebalance_interval=self.rebalance_interval,
                wave_timeout=self.wave_timeout,
                policy=self.policy,
                status_interval=self.status_interval,
                reads_token_file=self.api_token_file if self.token_for_reads else None,
            ),
            grace=self.grace,
            console=self.console,
        )

    @property
    def api_token_file(self) -> Path:
        return self.run_dir / "api-token"

    @property
    def children(self) -> list[Child]:
        return self.cluster.children

    @property
    def nodes(self) -> list[Child]:
        return self.cluster.nodes

    @property
    def balancer(self) -> Child:
        return self.cluster.balancer

    # signals

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
            return
        if self.stop_signal is not None:
            self.force = True
        self.stop_signal = signum

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {s: signal.signal(s, self.on_signal) for s in sigs}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    @property
    def stopping(self) -> bool:
        return self.stop_signal is not None

    # setup

    def prepare(self) -> None:
        """The run directory's files and the children (not started)."""
        if not port_free(self.port):
            raise LocalRunError(
                f"port {self.port} on {HOST} is already in use (another treewave run?); "
                "choose another with --port"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / TOPOLOGY_PATH_FILE).write_text(f"{self.topology_path}\n", "utf-8")
        # A fresh link secret per run: servers accept links only from neighbours and the
        # balancer that prove it.
        ensure_secret(self.cluster.secret_file)
        if self.token_for_reads:
            ensure_secret(self.api_token_file)
            self.api_token = read_secret(self.api_token_file, what="API token")
        self.cluster.create()
        self.changes = TopologyReload(
            self.cluster, self.topology_path, self.console, self.api_token, lambda: self.stopping
        )

    # health

    def healthy(self, child: Child) -> bool:
        if not child.alive():
            return False
        body = get_json(child.url + "/healthz", timeout=1.0)
        if not isinstance(body, dict) or body.get("status") != "ok":
            return False
        if child.kind == "balancer":
            return bool(body.get("links_up") == body.get("servers") == len(self.topology))
        return True

    def tree_complete(self) -> bool:
        overrides = SettingOverrides(wave_timeout_s=self.wave_timeout)
        setting = effective_settings(self.topology.settings, overrides).wave_timeout_s
        timeout = wave_deadline_s(setting, self.topology.depth, len(self.topology.servers)) + 2.0
        body = get_json(self.balancer.url + "/api/tree", timeout=timeout, token=self.api_token)
        return isinstance(body, dict) and body.get("complete") is True

    # the loop

    def check_children(self) -> None:
        """Notice deaths, and restart children whose backoff has passed."""
        now = time.monotonic()
        for child in self.children:
            if self.stopping:
                return
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self.cluster.start(child)
                    child.recovering = True
                    self.console.say(f"{child.label} restarted (pid {child.pid})")
                continue
            assert child.proc is not None
            code = child.proc.poll()
            if code is None:
                continue
            ran = now - child.started_at
            child.failures = child.failures + 1 if ran < STABLE_S else 1
            delay = restart_delay(child.failures)
            child.restart_at = now + delay
            self.console.warn(
                f"{child.label} (pid {child.pid}, port {child.port}) died: "
                f"{describe_exit(code)}; restarting in {delay:g} s"
            )
            if code > 0:
                for line in tail(child.log_path, 3):
                    self.console.warn(f"  {child.name}| {line}")

    def wait_ready(self) -> bool:
        """Until every child is healthy and an Echo wave is complete; False if stopped."""
        progress = self.console.progress
        deadline = time.monotonic() + self.ready_timeout
        total = len(self.nodes)
        up: set[str] = set()
        while not self.stopping:
            self.check_children()
            failing = [c for c in self.children if c.failures >= START_ATTEMPTS]
            if failing:
                progress.done()
                raise LocalRunError(
                    f"{', '.join(c.label for c in failing)} failed to start {START_ATTEMPTS} "
                    "times in a row (the log lines above tell why)"
                )
            for child in self.nodes:
                if child.name not in up and self.healthy(child):
                    up.add(child.name)
                elif child.name in up and not child.alive():
                    up.discard(child.name)
            if len(up) < total:
                progress.update(f"waiting for servers: {len(up)}/{total} healthy")
            elif not self.healthy(self.balancer):
                body = get_json(self.balancer.url + "/healthz", timeout=1.0)
                links = body.get("links_up", 0) if isinstance(body, dict) else 0
                progress.update(f"waiting for the balancer: linked to {links}/{total} servers")
            else:
                progress.update("waiting for a complete Echo wave")
                if self.tree_complete():
                    progress.done()
                    for child in self.children:
                        child.recovering = False
                    return True
            if time.monotonic() > deadline:
                progress.done()
                self.report_not_ready(up)
                raise LocalRunError(
                    f"the cluster was not ready after {self.ready_timeout:g} s "
                    "(the log tails above tell why)"
                )
            time.sleep(LOOP_S * 2)
        progress.done()
        return False

    def report_not_ready(self, up: set[str]) -> None:
        for child in self.children:
            if child.name in up and child.kind == "node":
                continue
            state = "running" if child.alive() else "not running"
            self.console.warn(
                f"{child.label} (port {child.port}, {state}) is not ready; its log ends:"
            )
            for line in tail(child.log_path):
                self.console.warn(f"  {child.name}| {line}")

    def print_ready(self) -> None:
        url = self.balancer.url
        width = max(len(c.name) for c in self.children)
        lines = [
            f"ready: {len(self.nodes)} servers and the balancer are up",
            f"  status page  {url}/",
            f"  API          {url}/api/tree  (also /api/status, /api/finn, /api/rebalance, "
            "/api/tasks)",
            f"  metrics      {url}/metrics",
            "  servers:",
            *(f"    {c.name:<{width}}  {c.url}  pid {c.pid}" for c in self.nodes),
            f"    {'balancer':<{width}}  {url}  pid {self.balancer.pid}",
            f"  reload       edit {self.topology_path}, then: kill -HUP {os.getpid()}",
            f"  logs         {self.cluster.log_dir}",
            f"  state        {self.state_dir}",
            *(
                [f"  API token    {self.api_token_file}  (reads need it too: the page asks)"]
                if self.token_for_reads
                else []
            ),
            "try: treewave status"
            + ("" if self.port == DEFAULT_PORT else f" --balancer {url}")
            + (f" --token-file {self.api_token_file}" if self.token_for_reads else "")
            + "   (Ctrl-C stops everything)",
        ]
        print("\n".join(lines), file=self.out, flush=True)

    def supervise(self) -> None:
        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                self.changes.reload()
                self.topology = self.cluster.topology
            self.changes.follow_drain()
            self.check_children()
            for child in self.children:
                if child.recovering and child.restart_at is None and self.healthy(child):
                    child.recovering = False
                    self.console.say(f"{child.label} is healthy again")
            time.sleep(LOOP_S)

    def run(self) -> int:
        with self.signals():
            try:
                self.prepare()
                self.console.say(
                    f"starting {len(self.nodes)} servers (ports {self.nodes[0].port}-"
                    f"{self.nodes[-1].port}) and the balancer (port {self.port})"
                )
                for child in self.children:
                    self.cluster.start(child)
                if self.wait_ready():
                    self.print_ready()
                    self.supervise()
            finally:
                self.console.progress.done()
                why = signal.Signals(self.stop_signal).name if self.stop_signal else "shutdown"
                self.cluster.stop_all(why, lambda: self.force)
        return 0
