"""`treewave apply`: change the topology of a running deployment without losing a task.

Under Compose (the default): validate the topology file, render the deployment files,
`docker compose up -d` (added servers start; Compose recreates the balancer, whose
definition carries a hash of the topology, and every server whose own view changed), hand
the topology to the balancer (`POST /api/topology`), show a progress bar per retiring
server from `GET /api/topology`, and once the balancer reports a server retired (drained,
holding nothing) check from inside its container that it really holds nothing, then remove
the container and its queue volume. Everything that talks to the engine other than
Compose itself goes through the Docker SDK (`docker` package).

With `--local`: find the `treewave run` supervising that topology file and send it
SIGHUP (it does the rest and prints the progress).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, TextIO

from treewave.cli.argtypes import positive_float
from treewave.cli.client_cmd import api_token
from treewave.cli.errors import CommandError
from treewave.core.topology import Topology, TopologyError
from treewave.generator.render import render
from treewave.local.rundir import find_run
from treewave.wire.topology_api import TopologyApiError, TopologyState, get_topology
from treewave.wire.topology_change import (
    DrainFollower,
    DrainTimeout,
    ProgressBars,
    post_retrying,
)
from treewave.wire.topology_file import load_topology

__all__ = ["NODE_TASKS", "register", "signal_local_run"]

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
VOLUME_LABEL = "com.docker.compose.volume"
INFRASTRUCTURE = frozenset({"balancer", "prometheus", "grafana", "secret"})
POLL_S = 1.0
NODE_TASKS = (
    "import urllib.request; print(urllib.request.urlopen("
    "'http://127.0.0.1:8000/api/tasks', timeout=10).read().decode())"
)

EXAMPLE = """\
examples:
  treewave generate --nodes 8 --seed 99 --out topology.json
  treewave apply                                  # Compose, topology.json in this directory
  treewave apply --topology deploy/topology.json --project treewave
  treewave apply --local --topology topology.json # a running `treewave run`
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "apply",
        help="change the topology of a running deployment, draining removed servers",
        description=textwrap.fill(
            "Make a running deployment run the topology file: new servers start, removed "
            "ones hand over their tasks and are removed only once they hold nothing.",
            88,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    p.add_argument("--topology", type=Path, default=Path("topology.json"), metavar="FILE")
    p.add_argument(
        "--local",
        action="store_true",
        help="signal the `treewave run` supervising FILE instead of using Compose",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the compose file is rendered (default: the topology file's directory)",
    )
    p.add_argument(
        "--project",
        default=os.environ.get("COMPOSE_PROJECT_NAME", "treewave"),
        help="Compose project name (default: $COMPOSE_PROJECT_NAME or treewave)",
    )
    p.add_argument(
        "--balancer",
        default=None,
        metavar="URL",
        help="balancer URL (default: http://127.0.0.1:$TREEWAVE_BALANCER_PORT, port 7999)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        metavar="S",
        help="give up waiting for the drain after this many seconds (default: 600)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the balancer's API token, needed when it is published beyond loopback "
        "(else $TREEWAVE_API_TOKEN)",
    )
    p.add_argument(
        "--without",
        action="append",
        default=[],
        choices=["prometheus", "grafana"],
        help="do not bring this service up (repeatable)",
    )
    p.set_defaults(handler=apply)


def apply(args: argparse.Namespace) -> int:
    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        print(
            f"treewave apply: {exc.source} is not a valid topology; nothing changed:",
            file=sys.stderr,
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if args.local:
        return signal_local_run(args.topology)
    balancer = args.balancer or "http://127.0.0.1:" + os.environ.get(
        "TREEWAVE_BALANCER_PORT", "7999"
    )
    out_dir = args.out_dir or args.topology.resolve().parent
    deployment = ComposeDeployment(args.project, out_dir, balancer, api_token(args.token_file))
    extras = [s for s in ("prometheus", "grafana") if s not in args.without]
    return deployment.apply(topology, args.topology, args.timeout, extras)


# --- local mode -------------------------------------------------------------------------------


def signal_local_run(topology_path: Path) -> int:
    """SIGHUP the live `treewave run` whose topology file is `topology_path`."""
    pid = find_run(topology_path)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            pid = None  # it ended meanwhile
    if pid is None:
        raise CommandError(f"no running `treewave run` supervises {topology_path.resolve()}")
    print(f"sent SIGHUP to treewave run (pid {pid}); it prints the progress")
    return 0


# --- Compose ----------------------------------------------------------------------------------


class ComposeDeployment:
    """One Compose project, driven by `docker compose` and the Docker SDK."""

    def __init__(
        self, project: str, directory: Path, balancer: str, token: str, out: TextIO = sys.stdout
    ) -> None:
        self.project = project
        self.directory = directory
        self.balancer = balancer
        self.token = token
        self.out = out
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            # The SDK, imported here so that other commands never load it.
            docker: Any = importlib.import_module("docker")
            try:
                self._engine = docker.from_env()
                self._engine.ping()
            except docker.errors.DockerException as exc:
                raise CommandError(f"cannot reach the Docker engine: {exc}") from None
        return self._engine

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # engine queries

    def containers(self, service: str | None = None) -> list[Any]:
        labels = [f"{PROJECT_LABEL}={self.project}"]
        if service is not None:
            labels.append(f"{SERVICE_LABEL}={service}")
        found: list[Any] = self.engine.containers.list(all=True, filters={"label": labels})
        return found

    def server_services(self) -> set[str]:
        return {c.labels.get(SERVICE_LABEL, "") for c in self.containers()} - INFRASTRUCTURE

    def wait_healthy(self, services: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(services)
        while waiting:
            for service in sorted(waiting):
                found = self.containers(service)
                if found and all(_health(c) == "healthy" for c in found):
                    waiting.discard(service)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise CommandError(f"not healthy after {timeout:g} s: {', '.join(sorted(waiting))}")
            time.sleep(POLL_S)

    def node_tasks(self, container: Any) -> dict[str, Any]:
        """The server's own `/api/tasks`, from inside its container (not published)."""
        code, output = container.exec_run(["python", "-c", NODE_TASKS])
        if code != 0:
            raise CommandError(f"{container.name}: cannot read its tasks: {output!r}")
        tasks: dict[str, Any] = json.loads(output)
        return tasks

    def remove_server(self, name: str) -> int:
        """Remove a retired server's container and queue volume; returns how many tasks it
        still held (0, or nothing is removed)."""
        held = 0
        for container in self.containers(name):
            container.reload()
            if container.status == "running":
                tasks = self.node_tasks(container)
                held += sum(len(tasks[k]) for k in ("queued", "running", "reserved"))
        if held:
            return held
        for container in self.containers(name):
            container.remove(force=True)
        volumes = self.engine.volumes.list(
            filters={"label": [f"{PROJECT_LABEL}={self.project}", f"{VOLUME_LABEL}=state-{name}"]}
        )
        for volume in volumes:
            volume.remove(force=True)
        return 0

    # the steps

    def compose(self, *args: str) -> None:
        cmd = ["docker", "compose", "-p", self.project, "-f", str(self.directory / "compose.yml")]
        done = subprocess.run([*cmd, *args], cwd=self.directory, check=False)
        if done.returncode != 0:
            raise CommandError(f"`docker compose {' '.join(args)}` failed ({done.returncode})")

    def apply(
        self, topology: Topology, topology_path: Path, timeout: float, extras: list[str]
    ) -> int:
        try:
            # Before anything changes: a balancer without the topology API could not drain
            # anything, and Compose cannot be undone.
            get_topology(self.balancer, token=self.token)
        except TopologyApiError as exc:
            raise CommandError(f"{exc}; nothing changed") from None
        before = self.server_services()
        relative = os.path.relpath(topology_path.resolve(), self.directory.resolve())
        render(topology, relative, self.directory)
        self.say(f"rendered {self.directory / 'compose.yml'} ({len(topology)} servers)")
        self.compose("up", "-d", *topology.names, "balancer", *extras)
        self.wait_healthy([*topology.names, "balancer"], timeout)
        for container in self.containers("prometheus"):
            if container.status == "running":  # it rereads its (re-rendered) targets
                container.kill(signal="SIGHUP")
        removed = sorted(before - set(topology.names))
        self.post(topology, timeout)
        self.say(
            "the balancer adopted the topology"
            + (f"; draining {', '.join(removed)}" if removed else "")
        )
        state = self.follow_drain(removed, timeout)
        moved = lost = 0
        for name in removed:
            if not state.is_retired(name):
                continue
            held = self.remove_server(name)
            lost += held
            if held:
                self.say(f"{name}: reported retired but still holds {held} tasks; kept")
            else:
                moved += int(state.retired[name].get("moved", 0))
                self.say(f"{name}: retired; container and queue volume removed")
        retired = sum(1 for n in removed if state.is_retired(n))
        self.say(f"moved {moved} tasks from {retired} retired servers; {lost} lost")
        return 0 if lost == 0 else 1

    def post(self, topology: Topology, timeout: float) -> None:
        """POST the topology; the recreated balancer may still be starting: retry."""
        try:
            post_retrying(
                self.balancer,
                topology.to_json_data(),
                token=self.token,
                within_s=timeout,
                every_s=POLL_S,
            )
        except TopologyApiError as exc:
            raise CommandError(str(exc)) from None

    def follow_drain(self, removed: list[str], timeout: float) -> TopologyState:
        """Progress bars until every removed server is retired."""
        follower = DrainFollower(self.balancer, self.token, list(removed))
        bars = ProgressBars(removed, self.out)
        try:
            return follower.wait(timeout, POLL_S, bars.show)
        except DrainTimeout as exc:
            raise CommandError(
                f"{exc} (nothing was removed; run `treewave apply` again to go on waiting)"
            ) from None
        except TopologyApiError as exc:
            raise CommandError(str(exc)) from None


def _health(container: Any) -> str:
    container.reload()
    state = container.attrs.get("State", {})
    health = state.get("Health")
    if health is None:
        return "healthy" if state.get("Status") == "running" else str(state.get("Status"))
    return str(health.get("Status"))
