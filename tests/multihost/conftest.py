"""The multi-host tier: a real 3-host Docker Swarm (the multihost lab: a network namespace
and a `dockerd` per host on this machine), the topology rendered with
`treewave render --target swarm` and deployed with `docker stack deploy`.

The lab's scripts are found in `../shared/multihost-lab` beside the repository (or where
TREEWAVE_MULTIHOST_LAB points). Skipped, with the reason, when the lab cannot run here
(not root, no Docker engine, no iproute2/iptables, no lab scripts) or when a lab is
already up on this machine (only one can exist; it is never touched);
TREEWAVE_REQUIRE_MULTIHOST=1 (CI) makes that a failure. The lab is always removed
(`down.sh`), also when a test or the set-up fails, and the teardown checks that nothing
of it is left. When a test failed, every service's log is saved under artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.http import http_request
from tests.support.waiting import wait_for_value
from treewave.core.topology import Topology
from treewave.generator.render import HOST_LABEL, PLACEMENT_FILE, read_placement, render_swarm

REPO = Path(__file__).resolve().parents[2]
LAB_STATE = Path("/run/twlab")
HOSTS = 3
STACK = "tw"
BALANCER_PORT = 7999
PROMETHEUS_PORT = 9090
CONVERGE_TIMEOUT_S = 240
DEPLOY_ATTEMPTS = 5
T = TypeVar("T")

_NODE_TASKS = (
    "import urllib.request; print(urllib.request.urlopen("
    "'http://127.0.0.1:8000/api/tasks', timeout=10).read().decode())"
)


def lab_directory() -> Path:
    return Path(os.environ.get("TREEWAVE_MULTIHOST_LAB", REPO.parent / "shared" / "multihost-lab"))


def lab_problem() -> str | None:
    """Why the multihost lab cannot run here, or None when it can."""
    lab = lab_directory()
    if not (lab / "up.sh").is_file():
        return f"no multihost lab scripts in {lab} (set TREEWAVE_MULTIHOST_LAB)"
    if os.geteuid() != 0:
        return "the multihost lab needs root (network namespaces, one dockerd per host)"
    for tool in ("docker", "ip", "iptables", "nsenter", "dockerd"):
        if shutil.which(tool) is None:
            return f"the multihost lab needs {tool}, which is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if info.returncode != 0:
        return f"no Docker engine on this machine: {info.stderr.strip()[:300]}"
    if any(LAB_STATE.glob("h*.pid")):
        return f"a multihost lab is already up on this machine ({LAB_STATE}); only one can exist"
    return None


def run(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env},
    )


@dataclass
class Lab:
    """A running lab: one Docker socket per host, host 1 the swarm manager."""

    sockets: list[str]
    image: str
    prometheus_image: str
    directory: Path

    @property
    def manager(self) -> str:
        return self.sockets[0]

    def host_address(self, host: int) -> str:
        return f"10.77.0.{10 + host}"

    def docker(self, *args: str, host: int = 1, timeout: float = 120) -> str:
        """A `docker` command against one host; fails the test when it fails."""
        done = run(["docker", "-H", self.sockets[host - 1], *args], timeout=timeout)
        assert done.returncode == 0, f"docker -H h{host} {' '.join(args)}: {done.stderr.strip()}"
        return done.stdout

    def partition(self, host: int, state: str) -> None:
        done = run(["bash", str(self.directory / "partition.sh"), str(host), state])
        assert done.returncode == 0, done.stderr

    def dockerd_pid(self, host: int) -> int:
        return int((LAB_STATE / f"h{host}.pid").read_text().strip())


@dataclass
class SwarmStack:
    """A treewave stack deployed on the lab."""

    lab: Lab
    topology: Topology
    directory: Path
    name: str = STACK
    notes: list[str] = field(default_factory=list)

    @property
    def placement(self) -> dict[str, int]:
        """Server name -> host number (1-based), as the renders placed it (removed servers
        too: the render remembers them)."""
        placed = read_placement(self.directory / PLACEMENT_FILE)
        return {name: int(label[1:]) for name, label in placed.items()}

    def servers_on(self, host: int) -> list[str]:
        names = set(self.topology.names)
        return sorted(n for n, h in self.placement.items() if h == host and n in names)

    @property
    def balancer_url(self) -> str:
        return f"http://{self.lab.host_address(1)}:{BALANCER_PORT}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.lab.host_address(1)}:{PROMETHEUS_PORT}"

    @property
    def token(self) -> str:
        return (self.directory / "secrets" / "api-token").read_text().strip()

    def deploy(self, *, prune: bool = False) -> None:
        """`docker stack deploy`; with `prune`, services no longer in the stack file go.
        Swarm refuses a service update that races one it is still making ("update out of
        sequence", moby/moby#30794); the deploy is run again then, as a user would (and as
        Docker's own tests do), and only then."""
        for attempt in range(DEPLOY_ATTEMPTS):
            done = run(
                [
                    "docker",
                    "stack",
                    "deploy",
                    *(["--prune"] if prune else []),
                    "-c",
                    str(self.directory / "stack.yml"),
                    self.name,
                ],
                DOCKER_HOST=self.lab.manager,
                TREEWAVE_IMAGE=self.lab.image,
                PROMETHEUS_IMAGE=self.lab.prometheus_image,
                TREEWAVE_BALANCER_PORT=str(BALANCER_PORT),
                TREEWAVE_PROMETHEUS_PORT=str(PROMETHEUS_PORT),
            )
            if done.returncode == 0 or "update out of sequence" not in done.stderr:
                break
            self.notes.append(f"deploy {attempt + 1}: update out of sequence, deployed again")
            time.sleep(1.0)
        assert done.returncode == 0, f"docker stack deploy: {done.stderr}"

    def redeploy(self, topology: Topology) -> None:
        """Render `topology` into the same directory (same secrets) and deploy it again."""
        (self.directory / "topology.json").write_text(topology.dumps(), encoding="utf-8")
        render_swarm(topology, "topology.json", self.directory, hosts=len(self.lab.sockets))
        self.topology = topology
        self.deploy()

    def services(self) -> list[str]:
        return [*self.topology.names, "balancer", "prometheus"]

    def healthy(self) -> bool:
        """Every service's one task running and healthy (per host, by its own engine)."""
        want = {f"{self.name}_{s}" for s in self.services()}
        seen: set[str] = set()
        for host in range(1, len(self.lab.sockets) + 1):
            out = self.lab.docker(
                "ps", "--filter", f"label=com.docker.stack.namespace={self.name}",
                "--format", '{{.Label "com.docker.swarm.service.name"}} {{.Status}}',
                host=host,
            )  # fmt: skip
            for line in out.splitlines():
                service, _, status = line.partition(" ")
                if "(healthy)" in status or (service.endswith("_prometheus") and "Up" in status):
                    seen.add(service)
        return want <= seen

    # --- the balancer's API ---------------------------------------------------------------

    def get(self, path: str, timeout: float = 30) -> Any:
        status, body = http_request(
            "GET", self.balancer_url + path, token=self.token, timeout=timeout
        )
        assert status == 200, f"GET {path} -> {status}: {body}"
        return body

    def post(self, path: str, body: Any, expect: int = 200, timeout: float = 60) -> Any:
        status, answer = http_request(
            "POST", self.balancer_url + path, body, token=self.token, timeout=timeout
        )
        assert status == expect, f"POST {path} {body} -> {status}: {answer}"
        return answer

    def prometheus(self, path: str) -> Any:
        status, body = http_request("GET", self.prometheus_url + path)
        assert status == 200, f"GET prometheus {path} -> {status}: {body}"
        return body

    def tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = self.get("/api/tree")
        return tree

    def complete_tree(self) -> dict[str, Any] | None:
        tree = self.tree()
        return tree if tree["complete"] else None

    # --- one server, from inside its container on its own host ----------------------------

    def container(self, server: str) -> str:
        host = self.placement[server]
        ids = self.lab.docker(
            "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.name}_{server}",
            host=host,
        ).split()  # fmt: skip
        assert len(ids) == 1, f"{server} on h{host}: expected one container, got {ids}"
        return ids[0]

    def node_tasks(self, server: str) -> dict[str, Any]:
        host = self.placement[server]
        out = self.lab.docker(
            "exec", self.container(server), "python", "-c", _NODE_TASKS, host=host, timeout=60
        )
        tasks: dict[str, Any] = json.loads(out)
        return tasks

    def task_places(self) -> dict[str, list[str]]:
        """Every task id in the cluster -> where it is ("server:place"), from each ledger."""
        places: dict[str, list[str]] = {}
        for server in self.topology.names:
            tasks = self.node_tasks(server)
            for place in ("queued", "running", "reserved", "completed"):
                for task in tasks[place]:
                    places.setdefault(task, []).append(f"{server}:{place}")
        return places

    @staticmethod
    def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 1) -> T:
        """A probe's assertion (a failed `docker` command too) or a failed connection
        means "not yet"."""
        return wait_for_value(what, probe, timeout, every, retry_on=(AssertionError, OSError))

    def dump_logs(self, request: pytest.FixtureRequest) -> None:
        parts = [f"notes: {self.notes}"]
        ps = run(["docker", "service", "ps", "--no-trunc", *self.qualified()], 120,
                 DOCKER_HOST=self.lab.manager)  # fmt: skip
        parts.append(ps.stdout + ps.stderr)
        for service in self.qualified():
            logs = run(["docker", "service", "logs", "--timestamps", "--tail", "200", service],
                       120, DOCKER_HOST=self.lab.manager)  # fmt: skip
            parts.append(f"===== {service}\n{logs.stdout}{logs.stderr}")
        text = "\n".join(parts)
        artifacts = REPO / "artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / f"multihost-{self.name}-logs.txt").write_text(text, encoding="utf-8")
        print(f"multihost: service logs saved in artifacts/multihost-{self.name}-logs.txt")

    def qualified(self) -> list[str]:
        return [f"{self.name}_{s}" for s in self.services()]


def _build_image(tag: str) -> None:
    done = run(
        [
            "docker", "build", "-q", "-t", tag, "-f", str(REPO / "docker" / "Dockerfile"),
            "--build-arg", f"PYTHON_IMAGE={os.environ.get('PYTHON_IMAGE', 'python:3.12-slim')}",
            str(REPO),
        ],
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, f"docker build failed: {done.stderr[-2000:]}"


def _lab_up(directory: Path, image: str) -> list[str]:
    done = run(["bash", str(directory / "up.sh"), str(HOSTS), image], timeout=600)
    assert done.returncode == 0, f"multihost lab up.sh failed: {done.stderr[-3000:]}"
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in done.stdout.splitlines()
        if line.startswith("export ")
    )
    sockets = exports["TWLAB_SOCKETS"].strip('"').split()
    assert len(sockets) == HOSTS, exports
    return sockets


def _load_image(socket: str, image: str) -> None:
    """`docker save | docker -H socket load`: only the host that runs it needs the image."""
    done = run(
        ["bash", "-c", 'set -o pipefail; docker save "$1" | docker -H "$2" load -q', "-", image,
         socket],
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"could not load {image} into {socket}: {done.stderr}"


def _lab_down(directory: Path) -> None:
    # Whatever a test froze must run again, or the lab's own teardown would hang on it.
    for pidfile in LAB_STATE.glob("h*.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGCONT)
    done = run(["bash", str(directory / "down.sh")], timeout=600)
    assert done.returncode == 0, f"multihost lab down.sh failed: {done.stderr}"
    left = list(LAB_STATE.glob("*")) if LAB_STATE.exists() else []
    netns = run(["ip", "netns", "list"]).stdout
    assert not left, f"the lab left {left}"
    assert "twlab-h" not in netns, f"the lab left network namespaces: {netns}"


@contextlib.contextmanager
def _launch(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, topology: Topology
) -> Iterator[SwarmStack]:
    problem = lab_problem()
    if problem:
        if os.environ.get("TREEWAVE_REQUIRE_MULTIHOST") == "1":
            pytest.fail(f"TREEWAVE_REQUIRE_MULTIHOST=1 but the multihost lab cannot run: {problem}")
        pytest.skip(f"needs the multihost lab: {problem}")
    directory = lab_directory()
    prometheus_image = os.environ.get("PROMETHEUS_IMAGE", "prom/prometheus:v2.53.0")
    image = f"treewave:multihost-{secrets.token_hex(4)}"
    _build_image(image)
    failed_before = request.session.testsfailed
    stack: SwarmStack | None = None
    try:
        sockets = _lab_up(directory, image)
        lab = Lab(sockets, image, prometheus_image, directory)
        _load_image(lab.manager, prometheus_image)  # Prometheus runs on host 1 only
        for host in range(1, HOSTS + 1):
            node_id = lab.docker("info", "--format", "{{.Swarm.NodeID}}", host=host).strip()
            lab.docker("node", "update", "--label-add", f"{HOST_LABEL}=h{host}", node_id)
        out = tmp_path_factory.mktemp("swarm")
        (out / "topology.json").write_text(topology.dumps(), encoding="utf-8")
        render_swarm(topology, "topology.json", out, hosts=HOSTS)
        stack = SwarmStack(lab, topology, out)
        started = time.monotonic()
        stack.deploy()
        stack.wait_for("every service healthy", lambda: stack.healthy() or None,
                       CONVERGE_TIMEOUT_S, every=2)  # fmt: skip
        stack.notes.append(f"deploy -> all healthy in {time.monotonic() - started:.1f} s")
        yield stack
    finally:
        if stack is not None:
            artifacts = REPO / "artifacts"
            artifacts.mkdir(exist_ok=True)
            (artifacts / "multihost-notes.txt").write_text("\n".join(stack.notes) + "\n")
            if request.session.testsfailed > failed_before:
                with contextlib.suppress(Exception):
                    stack.dump_logs(request)
        try:
            _lab_down(directory)
        finally:
            run(["docker", "rmi", image])


SwarmLauncher = Callable[
    [pytest.FixtureRequest, pytest.TempPathFactory, Topology],
    contextlib.AbstractContextManager[SwarmStack],
]


@pytest.fixture(scope="session")
def launch_swarm() -> SwarmLauncher:
    """`launch_swarm(request, tmp_path_factory, topology)`: a context manager that builds the
    image, brings the 3-host lab up, deploys the rendered stack, waits until every service
    is healthy and yields a `SwarmStack`; the lab is removed on exit, whatever happened."""
    return _launch
