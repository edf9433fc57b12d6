"""The real deployment: render a 7-server topology, `docker compose up` every service but
Grafana, and drive it through the balancer's published API and Prometheus.

Skipped when Docker Compose v2 is missing, unless TREEWAVE_REQUIRE_DOCKER=1 (CI) makes that
a failure. The stack is always torn down (`down -v --remove-orphans`); when a test fails
the services' logs are printed and saved under artifacts/.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from core.topology import Settings, Topology
from generator.dashboard import build_dashboard, iter_exprs
from generator.generate import generate
from generator.render import render

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SERVERS = 7
SEED = 20240607
UP_TIMEOUT_S = 600
T = TypeVar("T")


def _compose_problem() -> str | None:
    try:
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the docker CLI cannot run: {exc}"
    if probe.returncode != 0:
        return f"`docker compose version` failed: {probe.stderr.strip() or probe.stdout.strip()}"
    return None


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

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "docker",
                "compose",
                "-p",
                self.project,
                "-f",
                str(self.directory / "compose.yml"),
                *args,
            ],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _request(method: str, url: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status: int = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status = exc.code
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


def _get(url: str) -> Any:
    status, body = _request("GET", url)
    assert status == 200, f"GET {url} -> {status}: {body}"
    return body


def _post(url: str, body: Any, expect: int = 200) -> Any:
    status, answer = _request("POST", url, body)
    assert status == expect, f"POST {url} {body} -> {status}: {answer}"
    return answer


def _wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 1) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (AssertionError, OSError, urllib.error.URLError) as exc:
            last = exc
        else:
            if value is not None:
                return value
            last = "not yet"
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def _dump_logs(stack: Stack, request: pytest.FixtureRequest) -> None:
    logs = stack.compose("logs", "--no-color", "--timestamps", "--tail", "300", timeout=60)
    ps = stack.compose("ps", "-a", timeout=60)
    text = f"{ps.stdout}\n{ps.stderr}\n{logs.stdout}\n{logs.stderr}"
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / f"{stack.project}-logs.txt").write_text(text, encoding="utf-8")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n===== docker compose logs ({stack.project}) =====\n{text}")
    else:
        print(text)


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    problem = _compose_problem()
    if problem:
        if os.environ.get("TREEWAVE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"TREEWAVE_REQUIRE_DOCKER=1 but Docker Compose is unusable: {problem}")
        pytest.skip(f"needs Docker Compose v2: {problem}")

    # No periodic rebalancing: it would move queued tasks between the snapshots the tests
    # compare. Short tasks keep the drain quick.
    settings = Settings(task_time_s=1.0, rebalance_interval_s=0, wave_timeout_s=5.0)
    topology = generate(SERVERS, SEED, max_children=3, extra_parents=2, settings=settings)
    assert len(topology.edges) > SERVERS - 1, "the e2e topology should have an extra parent"

    directory = tmp_path_factory.mktemp("compose")
    (directory / "topology.json").write_text(topology.dumps(), encoding="utf-8")
    render(topology, "topology.json", directory, build_context=str(REPO))

    ports = {
        "TREEWAVE_BALANCER_PORT": _free_port(),
        "TREEWAVE_PROMETHEUS_PORT": _free_port(),
        "TREEWAVE_GRAFANA_PORT": _free_port(),
    }
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "TREEWAVE_BIND_ADDRESS": "127.0.0.1",
    }
    stack = Stack(
        topology=topology,
        project=f"treewave-e2e-{secrets.token_hex(4)}",
        directory=directory,
        env=env,
        balancer_url=f"http://127.0.0.1:{ports['TREEWAVE_BALANCER_PORT']}",
        prometheus_url=f"http://127.0.0.1:{ports['TREEWAVE_PROMETHEUS_PORT']}",
    )
    failed_before = request.session.testsfailed
    services = [*topology.names, "balancer", "prometheus"]  # Grafana cannot run here
    try:
        up = stack.compose("up", "--build", "-d", "--wait", *services, timeout=UP_TIMEOUT_S)
        if up.returncode != 0:
            _dump_logs(stack, request)
            pytest.fail(f"docker compose up failed:\n{up.stdout}\n{up.stderr}")
        yield stack
        if request.session.testsfailed > failed_before:
            _dump_logs(stack, request)
    finally:
        down = stack.compose("down", "-v", "--remove-orphans", timeout=300)
        assert down.returncode == 0, down.stderr


def _tree(stack: Stack) -> dict[str, Any]:
    tree: dict[str, Any] = _get(f"{stack.balancer_url}/api/tree")
    return tree


def _complete_tree(stack: Stack) -> dict[str, Any] | None:
    tree = _tree(stack)
    return tree if tree["complete"] else None


def _work(tree: dict[str, Any]) -> dict[str, int]:
    """Tasks each server has seen: queued + running + completed."""
    return {n["name"]: n["queued"] + n["running"] + n["completed"] for n in tree["nodes"]}


def test_tree_shows_every_server_and_edge(stack: Stack) -> None:
    tree = _wait_for("a complete Echo", lambda: _complete_tree(stack), timeout=60)
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(stack.topology.names)
    assert tree["missing"] == []
    edges = {(e["source"], e["target"]) for e in tree["edges"]}
    assert edges == set(stack.topology.edges)
    cpus = {n["name"]: n["cpus"] for n in tree["nodes"]}
    assert cpus == {s.name: s.cpus for s in stack.topology.servers}


def test_finn_gives_every_server_its_share(stack: Stack) -> None:
    before = _work(_wait_for("a complete Echo", lambda: _complete_tree(stack), timeout=60))
    answer = _post(f"{stack.balancer_url}/api/finn", {"tasks_per_node": 2})
    stack.submitted += 2 * SERVERS
    assert answer["complete"] is True, answer
    assert sorted(answer["decided"]) == sorted(stack.topology.names)
    after = _work(_wait_for("a complete Echo", lambda: _complete_tree(stack), timeout=60))
    assert {name: after[name] - before[name] for name in before} == dict.fromkeys(before, 2)


def test_skewed_load_is_rebalanced_and_nothing_is_lost(stack: Stack) -> None:
    leaf = stack.topology.leaves[0]
    _post(f"{stack.balancer_url}/api/tasks", {"node": leaf, "count": 30, "duration_s": 0.5}, 202)
    stack.submitted += 30
    moves = _post(f"{stack.balancer_url}/api/rebalance", {})
    assert moves["moves"], moves
    assert moves["max_pressure_after"] < moves["max_pressure_before"], moves

    def drained() -> dict[str, Any] | None:
        tree = _complete_tree(stack)
        if tree is None or any(n["queued"] or n["running"] for n in tree["nodes"]):
            return None
        return tree

    tree = _wait_for("every queue to drain", drained, timeout=180, every=2)
    initial = sum(s.tasks for s in stack.topology.servers)
    assert sum(n["completed"] for n in tree["nodes"]) == initial + stack.submitted


def _targets_up(stack: Stack) -> list[dict[str, Any]] | None:
    targets = _get(f"{stack.prometheus_url}/api/v1/targets")["data"]["activeTargets"]
    return targets if targets and all(t["health"] == "up" for t in targets) else None


def test_prometheus_scrapes_every_service(stack: Stack) -> None:
    targets = _wait_for("every scrape target up", lambda: _targets_up(stack), timeout=60)
    jobs = {t["labels"]["job"] for t in targets}
    assert jobs == {"treewave-nodes", "treewave-balancer", "prometheus"}
    query = urllib.parse.quote('up{job=~"treewave-nodes|treewave-balancer"}')
    result = _get(f"{stack.prometheus_url}/api/v1/query?query={query}")["data"]["result"]
    servers = {r["metric"].get("server") for r in result if r["metric"]["job"] == "treewave-nodes"}
    assert servers == set(stack.topology.names)
    assert len(result) == SERVERS + 1
    assert all(r["value"][1] == "1" for r in result)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    """Each panel query, as Grafana would send it with every server selected."""
    exprs = [e.replace("$server", ".+") for e in iter_exprs(build_dashboard(stack.topology))]
    empty = set(exprs)
    deadline = time.monotonic() + 90  # 1m rate windows need two scrapes of fresh counters
    while empty and time.monotonic() < deadline:
        _tree(stack)  # keep waves flowing so the wave histograms and rates have samples
        for expr in sorted(empty):
            query = urllib.parse.quote(expr)
            body = _get(f"{stack.prometheus_url}/api/v1/query?query={query}")
            assert body["status"] == "success", (expr, body)
            if body["data"]["result"]:
                empty.discard(expr)
        time.sleep(3)
    assert not empty, f"dashboard queries with no data: {sorted(empty)}"
