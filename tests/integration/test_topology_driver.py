"""The deployment-change driver (`treewave.wire.topology_change`) against real services:
the topology is posted again and again while the balancer is still starting, a refusal is
final at once, and the drain of a removed server is followed until the balancer reports it
retired, each retirement reported once; `treewave apply` drives it the same way."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import BALANCER, StartCluster
from tests.support.http import get_json
from treewave.cli.apply_cmd import ComposeDeployment
from treewave.cli.errors import CommandError
from treewave.core.topology import Topology
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
    # Started, not waited for: the first posts find no balancer listening. (Waiting for the
    # whole cluster's links would race the change itself, which retires pine and its link.)
    cluster.release(wait=False)
    post_retrying(cluster.balancer_url, without_pine(), within_s=120, every_s=0.2)
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


def test_apply_under_compose_posts_and_follows_through_the_driver(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    # The HTTP half of `treewave apply` (no Docker needed for it): post, then the bars.
    cluster = start_cluster(TOPOLOGY)
    out = io.StringIO()
    deployment = ComposeDeployment("unused", tmp_path, cluster.balancer_url, "", out)
    deployment.post(Topology.parse(without_pine()), timeout=30)
    state = deployment.follow_drain(["pine"], timeout=120)
    assert state.is_retired("pine")
    assert out.getvalue().splitlines()[-1] == f"{'pine':<16} [{'#' * 30}] retired"
    # A server that never retires (oak stays in the topology): a clear error at the limit.
    with pytest.raises(CommandError, match=r"still draining after 1 s: oak \(nothing was"):
        deployment.follow_drain(["oak"], timeout=1)
