"""What the container tests share: bring a rendered topology up under Docker Compose (every
service but Grafana, which cannot run here), talk to it, and always tear it down.

A test module gets its stack from the `launch_stack` fixture, usually in a module-scoped
fixture of its own so one stack serves the whole module:

    @pytest.fixture(scope="module")
    def stack(request, tmp_path_factory, launch_stack):
        with launch_stack(request, tmp_path_factory, topology, "faults") as stack:
            yield stack

Skipped when Docker Compose v2 is missing, unless TREEWAVE_REQUIRE_DOCKER=1 (CI) makes that
a failure. Each stack has its own project name (`treewave-<purpose>-<random>`) and free
host ports, so stacks of other people and other tests are never touched. When a test of
the module fails, the services' logs are printed and saved under artifacts/.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.compose import run_compose
from tests.support.http import http_request
from tests.support.ports import free_port
from tests.support.waiting import wait_for_value
from treewave.core.topology import Topology
from treewave.generator.render import render

# The Docker SDK, imported by name: mypy would resolve `import docker` to the project's
# docker/ folder (treewave apply and bench/topology_change import it the same way).
docker: Any = importlib.import_module("docker")

REPO = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 600


def compose_problem() -> str | None:
    """Why Docker Compose v2 cannot be used here, or None when it can."""
    try:
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the docker CLI cannot run: {exc}"
    if probe.returncode != 0:
        return f"`docker compose version` failed: {probe.stderr.strip() or probe.stdout.strip()}"
    return None


def _skip_without_compose() -> None:
    """Skip the test when Docker Compose v2 is unusable; fail it instead under
    TREEWAVE_REQUIRE_DOCKER=1 (CI), where a skip would hide a broken set-up."""
    problem = compose_problem()
    if problem:
        if os.environ.get("TREEWAVE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"TREEWAVE_REQUIRE_DOCKER=1 but Docker Compose is unusable: {problem}")
        pytest.skip(f"needs Docker Compose v2: {problem}")


@pytest.fixture
def require_compose() -> None:
    """For tests that start Compose projects themselves (not through `launch_stack`)."""
    _skip_without_compose()


_NODE_TASKS = (
    "import urllib.request; print(urllib.request.urlopen("
    "'http://127.0.0.1:8000/api/tasks', timeout=10).read().decode())"
)


@dataclass
class Stack:
    topology: Topology
    project: str
    directory: Path
    env: dict[str, str]
    balancer_url: str
    prometheus_url: str
    submitted: int = 0  # tasks added since start-up, on top of the topology's initial ones
    notes: list[str] = field(default_factory=list)
    _engine: Any = None

    # --- docker ------------------------------------------------------------------------------

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_compose(self.project, self.directory, self.env, *args, timeout=timeout)

    @property
    def engine(self) -> Any:
        """The Docker SDK client: faults are injected through it, as `treewave apply`
        drives the engine (only compose itself runs as a command)."""
        if self._engine is None:
            self._engine = docker.from_env()
        return self._engine

    def docker_container(self, name: str) -> Any:
        return self.engine.containers.get(name)

    def kill(self, container: str) -> None:
        self.docker_container(container).kill()

    def start(self, container: str) -> None:
        self.docker_container(container).start()

    def restart(self, container: str) -> None:
        self.docker_container(container).restart()

    def disconnect(self, network: str, container: str) -> None:
        self.engine.networks.get(network).disconnect(container)

    def connect(self, network: str, container: str) -> None:
        self.engine.networks.get(network).connect(container)

    def container(self, service: str) -> str:
        """The name of the (single) container of `service`, running or not."""
        ps = self.compose("ps", "-a", "--format", "{{.Name}}", service)
        names = ps.stdout.split()
        assert ps.returncode == 0, f"compose ps {service}: {ps.stderr}"
        assert len(names) == 1, f"{service}: expected one container, got {names}"
        return names[0]

    def attrs(self, container: str) -> dict[str, Any]:
        """What `docker inspect` shows, from the SDK."""
        attrs: dict[str, Any] = self.docker_container(container).attrs
        return attrs

    def status(self, container: str) -> str:
        return str(self.attrs(container)["State"]["Status"])

    def health(self, container: str) -> str:
        return str(self.attrs(container)["State"].get("Health", {}).get("Status", ""))

    def restart_count(self, container: str) -> int:
        return int(self.attrs(container)["RestartCount"])

    def node_tasks(self, server: str) -> dict[str, Any]:
        """GET /api/tasks of one server from inside its container (servers are not
        published to the host): every task there by id."""
        done = self.compose("exec", "-T", server, "python", "-c", _NODE_TASKS, timeout=60)
        assert done.returncode == 0, f"{server} /api/tasks: {done.stderr.strip()}"
        tasks: dict[str, Any] = json.loads(done.stdout)
        return tasks

    # --- HTTP ----------------------------------------------------------------------------------

    @staticmethod
    def get(url: str, timeout: float = 30) -> Any:
        status, body = http_request("GET", url, timeout=timeout)
        assert status == 200, f"GET {url} -> {status}: {body}"
        return body

    @staticmethod
    def post(url: str, body: Any, expect: int = 200, timeout: float = 30) -> Any:
        status, answer = http_request("POST", url, body, timeout=timeout)
        assert status == expect, f"POST {url} {body} -> {status}: {answer}"
        return answer

    def api(self, path: str) -> Any:
        return self.get(f"{self.balancer_url}{path}")

    def tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = self.api("/api/tree")
        return tree

    def complete_tree(self) -> dict[str, Any] | None:
        tree = self.tree()
        return tree if tree["complete"] else None

    wait_for = staticmethod(wait_for_value)
    """Retrying on the failures a stack has while it heals (`HEALING`)."""

    # --- failures ------------------------------------------------------------------------------

    def dump_logs(self, request: pytest.FixtureRequest) -> None:
        logs = self.compose("logs", "--no-color", "--timestamps", "--tail", "300", timeout=60)
        ps = self.compose("ps", "-a", timeout=60)
        text = f"{ps.stdout}\n{ps.stderr}\n{logs.stdout}\n{logs.stderr}"
        if self.notes:
            text = "notes:\n" + "\n".join(self.notes) + "\n\n" + text
        artifacts = REPO / "artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / f"{self.project}-logs.txt").write_text(text, encoding="utf-8")
        capture = request.config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            with capture.global_and_fixture_disabled():
                print(f"\n===== docker compose logs ({self.project}) =====\n{text}")
        else:
            print(text)


LaunchStack = Callable[..., contextlib.AbstractContextManager[Stack]]
"""`(request, tmp_path_factory, topology, purpose, bind_address="127.0.0.1")`."""


@contextlib.contextmanager
def _launch(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    topology: Topology,
    purpose: str,
    bind_address: str = "127.0.0.1",
) -> Iterator[Stack]:
    _skip_without_compose()
    directory = tmp_path_factory.mktemp(f"compose-{purpose}")
    (directory / "topology.json").write_text(topology.dumps(), encoding="utf-8")
    render(topology, "topology.json", directory, build_context=str(REPO))

    ports = {
        "TREEWAVE_BALANCER_PORT": free_port(),
        "TREEWAVE_PROMETHEUS_PORT": free_port(),
        "TREEWAVE_GRAFANA_PORT": free_port(),
    }
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "TREEWAVE_BIND_ADDRESS": bind_address,
    }
    host = f"[{bind_address}]" if ":" in bind_address else bind_address
    stack = Stack(
        topology=topology,
        project=f"treewave-{purpose}-{secrets.token_hex(4)}",
        directory=directory,
        env=env,
        balancer_url=f"http://{host}:{ports['TREEWAVE_BALANCER_PORT']}",
        prometheus_url=f"http://{host}:{ports['TREEWAVE_PROMETHEUS_PORT']}",
    )
    failed_before = request.session.testsfailed
    services = [*topology.names, "balancer", "prometheus"]  # Grafana cannot run here
    try:
        up = stack.compose("up", "--build", "-d", "--wait", *services, timeout=UP_TIMEOUT_S)
        if up.returncode != 0:
            stack.dump_logs(request)
            pytest.fail(f"docker compose up failed:\n{up.stdout}\n{up.stderr}")
        yield stack
        if request.session.testsfailed > failed_before:
            stack.dump_logs(request)
    finally:
        down = stack.compose("down", "-v", "--remove-orphans", timeout=300)
        assert down.returncode == 0, down.stderr
        # `down -v` removes the volumes of the services in the current file only: a server a
        # test removed from the topology (an orphan) leaves its queue volume behind.
        label = f"com.docker.compose.project={stack.project}"
        for volume in stack.engine.volumes.list(filters={"label": label}):
            volume.remove(force=True)
        assert not stack.engine.volumes.list(filters={"label": label})


@pytest.fixture(scope="session")
def launch_stack() -> LaunchStack:
    """`launch_stack(request, tmp_path_factory, topology, purpose, bind_address=...)`: a
    context manager that renders `topology`, brings it up with its ports published on
    `bind_address` (default 127.0.0.1) and yields a `Stack`, tearing it down on exit."""
    return _launch
