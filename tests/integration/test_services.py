"""The services as real processes on loopback: Echo, Finn and rebalancing end to end.

Every server is its own `python -m treewave.cli.main node` process and the balancer another; they
talk over real WebSockets. Nothing here asserts on time: waits poll with generous limits.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest

from tests.support.cluster import Cluster, StartCluster
from tests.support.http import fetch_json

# The default topology's shape: a rooted DAG (fjord has two parents).
SERVERS: list[dict[str, Any]] = [
    {"name": "aurora", "cpus": 4, "tasks": 2, "children": ["birch", "cedar", "delta"]},
    {"name": "birch", "cpus": 2, "tasks": 1, "children": ["ember", "fjord"]},
    {"name": "cedar", "cpus": 2, "tasks": 0, "children": ["fjord", "grove"]},
    {"name": "delta", "cpus": 1, "tasks": 3, "children": ["harbor"]},
    {"name": "ember", "cpus": 1, "tasks": 0, "children": []},
    {"name": "fjord", "cpus": 2, "tasks": 4, "children": ["iris"]},
    {"name": "grove", "cpus": 1, "tasks": 0, "children": []},
    {"name": "harbor", "cpus": 2, "tasks": 1, "children": ["juniper"]},
    {"name": "iris", "cpus": 1, "tasks": 0, "children": []},
    {"name": "juniper", "cpus": 1, "tasks": 2, "children": []},
]
LONG = 3600.0
"""A task duration no test outlives: such tasks never complete during a test."""

IDLE_DAG = {"settings": {"task_time_s": LONG, "wave_timeout_s": 10}, "servers": SERVERS}
QUICK_DAG = {"settings": {"task_time_s": 0.3, "wave_timeout_s": 10}, "servers": SERVERS}
TREE = {
    "settings": {"task_time_s": LONG, "wave_timeout_s": 10},
    "servers": [
        {"name": "oak", "cpus": 2, "tasks": 1, "children": ["pine", "yew"]},
        {"name": "pine", "cpus": 1, "tasks": 0, "children": ["ash", "elm"]},
        {"name": "yew", "cpus": 1, "tasks": 3, "children": []},
        {"name": "ash", "cpus": 1, "tasks": 0, "children": []},
        {"name": "elm", "cpus": 2, "tasks": 2, "children": []},
    ],
}


@pytest.fixture(scope="module")
def idle_dag(start_module_cluster: StartCluster) -> Cluster:
    return start_module_cluster(IDLE_DAG)


async def post(http: aiohttp.ClientSession, url: str, body: Any, status: int = 200) -> Any:
    async with http.post(url, json=body) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


async def states(http: aiohttp.ClientSession, cluster: Cluster) -> dict[str, Any]:
    got = await asyncio.gather(
        *(fetch_json(http, cluster.url(n) + "/api/state") for n in cluster.names)
    )
    return {s["name"]: s for s in got}


async def tasks_of(http: aiohttp.ClientSession, cluster: Cluster, name: str) -> Any:
    return await fetch_json(http, cluster.url(name) + "/api/tasks")


async def poll(check: Any, what: str, limit_s: float = 120.0, every: float = 0.1) -> Any:
    """Await `check()` until it returns something truthy; fail after a generous timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


def assert_spanning_tree(nodes: list[dict[str, Any]], cluster: Cluster) -> None:
    """Every server's `echo_parent` is a topology neighbour (the balancer for the root) and
    following them from any server reaches the balancer without a cycle."""
    parent = {n["name"]: n["echo_parent"] for n in nodes}
    assert parent[cluster.root] == "balancer"
    for name, p in parent.items():
        if name != cluster.root:
            assert p in cluster.parents(name) + cluster.children(name), (name, p)
    for name in parent:
        seen = {name}
        at = name
        while at != "balancer":
            at = parent[at]
            assert at not in seen, f"echo_parent cycle through {at}"
            seen.add(at)


# --- Echo ---------------------------------------------------------------------------------


async def test_echo_returns_the_topology_and_the_true_loads(
    idle_dag: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster = idle_dag
    # Give every server with a free slot some short tasks and let them finish, so the
    # snapshot also has completed work to report (the hour-long ones never finish).
    spare = {s["name"]: s["cpus"] - s["tasks"] for s in SERVERS if s["cpus"] > s["tasks"]}
    before = await states(http, cluster)
    for name, free in spare.items():
        body = {"node": name, "count": free, "duration_s": 0.05}
        accepted = await post(http, cluster.balancer_url + "/api/tasks", body, status=202)
        assert accepted["accepted"] == free

    async def finished() -> bool:
        now = await states(http, cluster)
        return all(
            now[n]["completed"] == before[n]["completed"] + spare.get(n, 0) for n in cluster.names
        )

    await poll(finished, "the short tasks to complete")

    tree = await fetch_json(http, cluster.balancer_url + "/api/tree")
    live = await states(http, cluster)  # idle: nothing starts or ends any more

    assert tree["complete"] is True
    assert tree["missing"] == []
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(cluster.names)
    assert {(e["source"], e["target"]) for e in tree["edges"]} == cluster.edges
    assert len(tree["edges"]) == len(cluster.edges)
    assert tree["messages"] == 2 * (len(cluster.edges) + 1)
    for node in tree["nodes"]:
        state = live[node["name"]]
        for key in ("cpus", "running", "queued", "completed"):
            assert node[key] == state[key], (node["name"], key, node[key], state[key])
        spec = next(s for s in SERVERS if s["name"] == node["name"])
        assert node["cpus"] == spec["cpus"]
        assert node["running"] == min(spec["cpus"], node["running"] + node["queued"])
    assert sum(n["completed"] for n in tree["nodes"]) >= sum(spare.values())
    assert_spanning_tree(tree["nodes"], cluster)


async def test_concurrent_echo_waves_are_each_complete(
    idle_dag: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster = idle_dag
    trees = await asyncio.gather(
        *(fetch_json(http, cluster.balancer_url + "/api/tree") for _ in range(8))
    )
    assert len({t["wave_id"] for t in trees}) == 8
    live = await states(http, cluster)
    for tree in trees:
        assert tree["complete"] is True, tree["missing"]
        assert tree["messages"] == 2 * (len(cluster.edges) + 1)
        assert_spanning_tree(tree["nodes"], cluster)
        for node in tree["nodes"]:
            assert node["queued"] == live[node["name"]]["queued"]
            assert node["running"] == live[node["name"]]["running"]


# --- Finn ---------------------------------------------------------------------------------


def total(state: dict[str, Any]) -> int:
    return int(state["queued"] + state["running"] + state["completed"])


async def test_finn_gives_every_server_exactly_k_tasks(
    idle_dag: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster = idle_dag
    k = 3
    before = await states(http, cluster)
    finn = await post(
        http, cluster.balancer_url + "/api/finn", {"tasks_per_node": k, "duration_s": LONG}
    )
    assert finn["complete"] is True
    assert finn["missing"] == []
    assert finn["decided"] == sorted(cluster.names)
    # At least one message per directed edge (balancer->root, the topology, leaves->balancer).
    assert finn["messages"] >= len(cluster.edges) + 1 + len(cluster.leaves)
    wave = finn["wave_id"]

    # The balancer decides only after every server has decided, and a server enqueues
    # its share when it decides: the tasks are already there.
    after = await states(http, cluster)
    for name in cluster.names:
        assert total(after[name]) == total(before[name]) + k, name
        ids = await tasks_of(http, cluster, name)
        mine = [t for where in ("queued", "running", "completed") for t in ids[where] if wave in t]
        assert len(mine) == k, (name, mine)
        assert len(set(mine)) == k


async def test_concurrent_finn_waves_on_a_tree(
    start_cluster: StartCluster, http: aiohttp.ClientSession
) -> None:
    cluster = start_cluster(TREE)
    before = await states(http, cluster)
    sizes = [1, 2, 4]
    waves = await asyncio.gather(
        *(
            post(
                http,
                cluster.balancer_url + "/api/finn",
                {"tasks_per_node": k, "duration_s": LONG},
            )
            for k in sizes
        )
    )
    assert len({w["wave_id"] for w in waves}) == len(sizes)
    for finn in waves:
        assert finn["complete"] is True
        assert finn["decided"] == sorted(cluster.names)
        # On a tree every directed edge carries exactly one message.
        assert finn["messages"] == len(cluster.edges) + 1 + len(cluster.leaves)
    after = await states(http, cluster)
    for name in cluster.names:
        assert total(after[name]) == total(before[name]) + sum(sizes), name
        ids = await tasks_of(http, cluster, name)
        everything = ids["queued"] + ids["running"] + ids["completed"]
        for finn, k in zip(waves, sizes, strict=True):
            assert sum(1 for t in everything if finn["wave_id"] in t) == k
    tree = await fetch_json(http, cluster.balancer_url + "/api/tree")
    assert tree["complete"] is True
    assert tree["messages"] == 2 * (len(cluster.edges) + 1)
    assert_spanning_tree(tree["nodes"], cluster)


# --- Rebalance ----------------------------------------------------------------------------


class Conservation:
    """Checks, while tasks run and move, that each task is in exactly one place.

    The servers are read one by one, so a poll is not an atomic snapshot; the checks are
    the ones that hold however the reads interleave with the moves. Tasks only move away
    from the donor (asserted from the rebalance answer), so each poll reads the donor,
    then every other server, then the donor again:
    - every submitted task is found somewhere (queued, running, reserved or completed) in
      the donor's first read or the others' reads: nothing is lost;
    - no task is held (queued, running or completed) by two servers, comparing the others
      with each other and with the donor's second read: nothing is duplicated. A task
      reserved at the donor may already be queued at the recipient: that is the transfer
      in flight (two-phase), not a duplicate, so reserved ids are left out of this check;
    - inside one server, the four places are disjoint (that read is atomic).
    """

    def __init__(self, cluster: Cluster, donor: str, submitted: set[str]) -> None:
        self.cluster = cluster
        self.donor = donor
        self.submitted = submitted
        self.others = [n for n in cluster.names if n != donor]
        self.polls = 0
        self.seen_reserved = 0
        self.seen_elsewhere: set[str] = set()

    @staticmethod
    def places(tasks: dict[str, Any]) -> dict[str, list[str]]:
        return {k: tasks[k] for k in ("queued", "running", "reserved", "completed")}

    def check_one(self, tasks: dict[str, Any]) -> None:
        ids = [t for where in self.places(tasks).values() for t in where]
        dup = [t for t, c in Counter(ids).items() if c > 1]
        assert not dup, f"{tasks['name']} holds {dup} in two places at once"

    @staticmethod
    def held(tasks: dict[str, Any]) -> set[str]:
        return set(tasks["queued"]) | set(tasks["running"]) | set(tasks["completed"])

    async def poll_once(self, http: aiohttp.ClientSession) -> bool:
        """One poll; True once every submitted task has completed."""
        first = await tasks_of(http, self.cluster, self.donor)
        others = await asyncio.gather(*(tasks_of(http, self.cluster, n) for n in self.others))
        second = await tasks_of(http, self.cluster, self.donor)
        for t in (first, *others, second):
            self.check_one(t)
        self.polls += 1
        self.seen_reserved += len(first["reserved"]) + len(second["reserved"])

        found = {t for r in (first, *others) for where in self.places(r).values() for t in where}
        lost = self.submitted - found
        assert not lost, f"poll {self.polls}: tasks found nowhere: {sorted(lost)}"
        assert found <= self.submitted, f"unknown tasks: {sorted(found - self.submitted)}"

        holders = [(r["name"], self.held(r)) for r in (*others, second)]
        for i, (a, ha) in enumerate(holders):
            for b, hb in holders[i + 1 :]:
                both = ha & hb
                assert not both, f"poll {self.polls}: {sorted(both)} held by {a} and {b}"
        for r in others:
            self.seen_elsewhere |= self.held(r) & self.submitted

        completed = sum(len(r["completed"]) for r in (*others, second))
        return completed == len(self.submitted)


async def test_rebalance_spreads_40_tasks_and_loses_none(
    start_cluster: StartCluster, http: aiohttp.ClientSession
) -> None:
    cluster = start_cluster(QUICK_DAG)
    donor = "juniper"  # a leaf with one CPU, at the bottom of the deepest path
    assert donor in cluster.leaves
    initial = sum(s["tasks"] for s in SERVERS)

    # Let the initial tasks finish so that the donor is the only server with a queue.
    async def all_done() -> bool:
        now = await states(http, cluster)
        return sum(s["completed"] for s in now.values()) == initial and all(
            s["queued"] + s["running"] + s["reserved"] == 0 for s in now.values()
        )

    await poll(all_done, "the initial tasks to complete")
    initial_ids: set[str] = set()
    for name in cluster.names:
        initial_ids |= set((await tasks_of(http, cluster, name))["completed"])
    assert len(initial_ids) == initial

    body = {"node": donor, "count": 40, "duration_s": 0.3}
    accepted = await post(http, cluster.balancer_url + "/api/tasks", body, status=202)
    assert accepted["accepted"] == 40
    first, last = accepted["first_task"], accepted["last_task"]
    batch = first.rsplit(".", 1)[0]
    assert last.rsplit(".", 1)[0] == batch
    new_ids = {f"{batch}.{i}" for i in range(40)}
    assert {first, last} <= new_ids
    submitted = initial_ids | new_ids

    async def queued_at_donor() -> bool:
        return len((await tasks_of(http, cluster, donor))["queued"]) > 30

    await poll(queued_at_donor, "the submitted tasks to reach the donor")

    watch = Conservation(cluster, donor, submitted)
    stop = asyncio.Event()

    async def watcher() -> None:
        while not stop.is_set():
            if await watch.poll_once(http):
                return
            await asyncio.sleep(0.01)

    watching = asyncio.create_task(watcher())
    try:
        result = await post(http, cluster.balancer_url + "/api/rebalance", {})
    except BaseException:
        stop.set()
        await asyncio.gather(watching, return_exceptions=True)
        raise
    assert result["complete"] is True, result
    assert result["moves"], result
    assert all(m["source"] == donor for m in result["moves"]), result["moves"]
    assert all(m["tasks"] > 0 for m in result["moves"])
    assert result["max_pressure_after"] < result["max_pressure_before"], result
    moved = sum(m["tasks"] for m in result["moves"])

    # The watcher returns once every task has completed (or raises on a violation).
    await asyncio.wait_for(watching, timeout=240)
    assert watch.polls >= 2
    assert watch.seen_elsewhere, "no moved task was ever seen at its recipient"

    final = {n: await tasks_of(http, cluster, n) for n in cluster.names}
    completed = [t for f in final.values() for t in f["completed"]]
    assert len(completed) == len(submitted), "a task completed twice or never"
    assert set(completed) == submitted
    for f in final.values():
        assert f["queued"] == f["running"] == f["reserved"] == []
        assert f["completed_count"] == len(f["completed"])
    live = await states(http, cluster)
    assert sum(s["transferred_out"] for s in live.values()) == moved
    assert live[donor]["transferred_out"] == moved
    assert sum(s["transferred_in"] for s in live.values()) == moved
    assert sum(s["completed"] for s in live.values()) == len(submitted)
    recipients = {m["target"] for m in result["moves"]}
    for name in recipients:
        got = set(final[name]["completed"]) & new_ids
        assert len(got) == live[name]["transferred_in"], name
