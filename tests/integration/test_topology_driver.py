"""The deployment-change driver (`treewave.wire.topology_change`) against real services:
the topology is posted again and again while the balancer is still starting, a refusal is
final at once, and the drain of a removed server is followed until the balancer reports it
retired, each retirement reported once."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest

from tests.support.cluster import BALANCER, StartCluster
from tests.support.http import get_json
from treewave.wire.topology_api import TopologyRejected
from treewave.wire.topology_change import DrainFollower, ProgressBars, post_retrying

TOPOLOGY: dict[str, Any] = {
    # Tasks far longer than the test: none completes, so every one must be somewhere.
    "settings": {"task_time_s": 300, "rebalance_interval_s": 0, "drain_grace_s": 2},
    "servers": [
        {"name": "oak", "cpus": 2, "tasks": 1, "children": ["pine", "yew"]},
        {"name": "pine", "cpus": 1, "tasks": 3, "children": []},
        {"name": "yew", "cpus": 1, "tasks": 0, "children": []},
    ],
}


def without_pine() -> dict[str, Any]:
    return {
        "settings": TOPOLOGY["settings"],
        "servers": [
            {"name": "oak", "cpus": 2, "tasks": 1, "children": ["yew"]},
            {"name": "yew", "cpus": 1, "tasks": 0, "children": []},
        ],
    }


def test_the_post_is_retried_until_the_balancer_is_up(start_cluster: StartCluster) -> None:
    cluster = start_cluster(TOPOLOGY, hold=(BALANCER,))
    releasing = threading.Thread(target=cluster.release)
    releasing.start()
    try:
        post_retrying(cluster.balancer_url, without_pine(), within_s=120, every_s=0.2)
    finally:
        releasing.join()
    state = get_json(cluster.balancer_url + "/api/topology")
    assert [s["name"] for s in state["topology"]["servers"]] == ["oak", "yew"]


def test_a_refused_topology_is_not_retried(start_cluster: StartCluster) -> None:
    cluster = start_cluster(TOPOLOGY)
    bad = without_pine()
    bad["servers"][0]["children"] = ["yew", "nobody"]
    # Retrying for an hour would hang the test: the refusal must end it at once.
    with pytest.raises(TopologyRejected) as refused:
        post_retrying(cluster.balancer_url, bad, within_s=3600)
    assert any("nobody" in p for p in refused.value.problems), refused.value.problems
    state = get_json(cluster.balancer_url + "/api/topology")
    assert len(state["topology"]["servers"]) == 3  # nothing changed


def test_the_drain_is_followed_until_the_server_is_retired(start_cluster: StartCluster) -> None:
    cluster = start_cluster(TOPOLOGY)
    post_retrying(cluster.balancer_url, without_pine(), within_s=30)
    follower = DrainFollower(cluster.balancer_url)
    follower.follow(["pine"])
    out = io.StringIO()
    state = follower.wait(120, every_s=0.2, show=ProgressBars(["pine"], out).show)
    assert state.is_retired("pine")
    assert follower.names == []
    assert out.getvalue().splitlines()[-1] == f"{'pine':<16} [{'#' * 30}] retired"
    # Once retired, it is not reported again.
    again = follower.poll()
    assert (again.retired, again.progressed) == ((), ())
    # The four tasks (none can have completed) are all in the new tree.
    tree = get_json(cluster.balancer_url + "/api/tree")
    assert {n["name"] for n in tree["nodes"]} == {"oak", "yew"}
    assert sum(n["queued"] + n["running"] for n in tree["nodes"]) == 4, tree["nodes"]
