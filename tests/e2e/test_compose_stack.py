"""The real deployment: render a 7-server topology, `docker compose up` every service but
Grafana, and drive it through the balancer's published API and Prometheus.

Skipped when Docker Compose v2 is missing, unless TREEWAVE_REQUIRE_DOCKER=1 (CI) makes that
a failure. The stack is always torn down (`down -v --remove-orphans`); when a test fails
the services' logs are printed and saved under artifacts/.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from treewave.core.topology import Settings
from treewave.generator.dashboard import build_dashboard, iter_exprs
from treewave.generator.generate import generate

pytestmark = pytest.mark.e2e

SERVERS = 7
SEED = 20240607


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    launch_stack: Any,
) -> Iterator[Any]:
    # No periodic rebalancing: it would move queued tasks between the snapshots the tests
    # compare. Short tasks keep the drain quick.
    settings = Settings(task_time_s=1.0, rebalance_interval_s=0, wave_timeout_s=5.0)
    topology = generate(SERVERS, SEED, max_children=3, extra_parents=2, settings=settings)
    assert len(topology.edges) > SERVERS - 1, "the e2e topology should have an extra parent"
    with launch_stack(request, tmp_path_factory, topology, "e2e") as stack:
        yield stack


def _work(tree: dict[str, Any]) -> dict[str, int]:
    """Tasks each server has seen: queued + running + completed."""
    return {n["name"]: n["queued"] + n["running"] + n["completed"] for n in tree["nodes"]}


def test_tree_shows_every_server_and_edge(stack: Any) -> None:
    tree = stack.wait_for("a complete Echo", stack.complete_tree, timeout=60)
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(stack.topology.names)
    assert tree["missing"] == []
    edges = {(e["source"], e["target"]) for e in tree["edges"]}
    assert edges == set(stack.topology.edges)
    cpus = {n["name"]: n["cpus"] for n in tree["nodes"]}
    assert cpus == {s.name: s.cpus for s in stack.topology.servers}


def test_finn_gives_every_server_its_share(stack: Any) -> None:
    before = _work(stack.wait_for("a complete Echo", stack.complete_tree, timeout=60))
    answer = stack.post(f"{stack.balancer_url}/api/finn", {"tasks_per_node": 2})
    stack.submitted += 2 * SERVERS
    assert answer["complete"] is True, answer
    assert sorted(answer["decided"]) == sorted(stack.topology.names)
    after = _work(stack.wait_for("a complete Echo", stack.complete_tree, timeout=60))
    assert {name: after[name] - before[name] for name in before} == dict.fromkeys(before, 2)


def test_skewed_load_is_rebalanced_and_nothing_is_lost(stack: Any) -> None:
    leaf = stack.topology.leaves[0]
    body = {"node": leaf, "count": 30, "duration_s": 0.5}
    stack.post(f"{stack.balancer_url}/api/tasks", body, 202)
    stack.submitted += 30
    moves = stack.post(f"{stack.balancer_url}/api/rebalance", {})
    assert moves["moves"], moves
    assert moves["max_pressure_after"] < moves["max_pressure_before"], moves

    def drained() -> dict[str, Any] | None:
        tree: dict[str, Any] | None = stack.complete_tree()
        if tree is None or any(n["queued"] or n["running"] for n in tree["nodes"]):
            return None
        return tree

    tree = stack.wait_for("every queue to drain", drained, timeout=180, every=2)
    initial = sum(s.tasks for s in stack.topology.servers)
    assert sum(n["completed"] for n in tree["nodes"]) == initial + stack.submitted


def _targets_up(stack: Any) -> list[dict[str, Any]] | None:
    targets = stack.get(f"{stack.prometheus_url}/api/v1/targets")["data"]["activeTargets"]
    return targets if targets and all(t["health"] == "up" for t in targets) else None


def test_prometheus_scrapes_every_service(stack: Any) -> None:
    targets = stack.wait_for("every scrape target up", lambda: _targets_up(stack), timeout=60)
    jobs = {t["labels"]["job"] for t in targets}
    assert jobs == {"treewave-nodes", "treewave-balancer", "prometheus"}
    query = urllib.parse.quote('up{job=~"treewave-nodes|treewave-balancer"}')
    result = stack.get(f"{stack.prometheus_url}/api/v1/query?query={query}")["data"]["result"]
    servers = {r["metric"].get("server") for r in result if r["metric"]["job"] == "treewave-nodes"}
    assert servers == set(stack.topology.names)
    assert len(result) == SERVERS + 1
    assert all(r["value"][1] == "1" for r in result)


def test_every_dashboard_query_returns_data(stack: Any) -> None:
    """Each panel query, as Grafana would send it with every server selected."""
    exprs = [e.replace("$server", ".+") for e in iter_exprs(build_dashboard(stack.topology))]
    empty = set(exprs)
    deadline = time.monotonic() + 90  # 1m rate windows need two scrapes of fresh counters
    while empty and time.monotonic() < deadline:
        stack.tree()  # keep waves flowing so the wave histograms and rates have samples
        for expr in sorted(empty):
            query = urllib.parse.quote(expr)
            body = stack.get(f"{stack.prometheus_url}/api/v1/query?query={query}")
            assert body["status"] == "success", (expr, body)
            if body["data"]["result"]:
                empty.discard(expr)
        time.sleep(3)
    assert not empty, f"dashboard queries with no data: {sorted(empty)}"
