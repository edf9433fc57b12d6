"""The Swarm target on a real 3-host swarm: 12 servers rendered with
`treewave render --target swarm --hosts 3` and deployed with `docker stack deploy`.

Placement is round-robin in topology order, so the file below is written to put the root
and the inner servers on host 1 and only leaves on hosts 2 and 3: cutting host 2 or 3 off
then hides exactly that host's servers (a server reachable only through a lost host would
be missing too; that is the topology's doing, not the host's). The tests run in file order
and share one stack:

1. every service lands on its host; Echo is complete over all three hosts; Finn gives every
   server exactly its share; Prometheus scrapes every server across hosts;
2. a skewed load is rebalanced with transfers crossing hosts, conserving every task id;
3. host 3 cut off the network: the next waves end partial within the deadline naming
   exactly host 3's servers, rebalancing moves nothing to or from them; healed: complete
   again, and every task id is in exactly one place (host 3's tasks came back with it);
4. host 2's engine and containers frozen (SIGSTOP on its dockerd, its containers paused)
   and thawed: the same guarantees;
5. every service stopped, then started again in reverse order (balancer first, root last):
   the services converge without any start order, each server with its queue;
6. re-deployed with a server appended to the topology: every service rolls onto the new
   topology, the existing servers keep their hosts and queues, the new one joins;
7. re-deployed without a server from the middle of the file (no `--prune`): every other
   server keeps its host (the render's placement file), the recreated balancer drains the
   removed one across hosts, and once it is retired `docker stack deploy --prune` removes its
   service and its volume can go: every task id exactly once, none lost.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from treewave.core.topology import Topology

pytestmark = pytest.mark.multihost

WAVE_TIMEOUT_S = 3.0
CLIENT_SLACK_S = 3.0
"""How far past the wave deadline an answer may come (timer tick, HTTP, a busy machine)."""
HEAL_TIMEOUT_S = 240
"""After a heal the engine's overlay re-learns the host before links can come back: about a
minute here, more on a busy machine."""
LONG_TASK_S = 900.0
"""Tasks that outlive the module: they stay queued or running, so their places are stable."""

TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": 1.0, "rebalance_interval_s": 0, "wave_timeout_s": WAVE_TIMEOUT_S},
    "servers": [
        # File order decides the host: 1, 2, 3, 1, 2, 3, ...
        {"name": "oak", "cpus": 2, "tasks": 1, "children": ["elm", "fir", "yew"]},
        {"name": "ash", "cpus": 1, "tasks": 0, "children": []},
        {"name": "ivy", "cpus": 2, "tasks": 1, "children": []},
        {"name": "elm", "cpus": 2, "tasks": 0, "children": ["ash", "ivy", "bay"]},
        {"name": "bay", "cpus": 2, "tasks": 2, "children": []},
        {"name": "lime", "cpus": 3, "tasks": 0, "children": []},
        {"name": "fir", "cpus": 1, "tasks": 1, "children": ["lime", "box", "bay"]},
        {"name": "box", "cpus": 4, "tasks": 0, "children": []},
        {"name": "pine", "cpus": 2, "tasks": 0, "children": []},
        {"name": "yew", "cpus": 2, "tasks": 0, "children": ["pine", "fig", "rue"]},
        {"name": "fig", "cpus": 1, "tasks": 1, "children": []},
        {"name": "rue", "cpus": 4, "tasks": 0, "children": []},
    ],
}


@pytest.fixture(scope="module")
def topology() -> Topology:
    return Topology.parse(TOPOLOGY)


@pytest.fixture(scope="module")
def swarm(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    launch_swarm: Any,
    topology: Topology,
) -> Iterator[Any]:
    with launch_swarm(request, tmp_path_factory, topology) as stack:
        yield stack


@pytest.fixture(scope="module")
def created(topology: Topology) -> set[str]:
    """Every task id created through the API or at start-up (Finn tasks are made by the
    servers themselves and are checked for uniqueness only)."""
    return {f"{s.name}:init:{i}" for s in topology.servers for i in range(1, s.tasks + 1)}


def submit(swarm: Any, created: set[str], server: str, count: int) -> list[str]:
    answer = swarm.post(
        "/api/tasks", {"node": server, "count": count, "duration_s": LONG_TASK_S}, 202
    )
    batch = answer["first_task"].rsplit(".", 1)[0]
    ids = [f"{batch}.{i}" for i in range(answer["accepted"])]
    assert ids[-1] == answer["last_task"], answer
    created.update(ids)
    return ids


def assert_every_task_once(swarm: Any, created: set[str]) -> None:
    """Every task in exactly one place in the whole cluster, none of the created ones lost."""
    places = swarm.task_places()
    twice = {task: where for task, where in places.items() if len(where) > 1}
    assert not twice, f"tasks in more than one place: {twice}"
    lost = sorted(created - places.keys())
    assert not lost, f"tasks lost: {lost}"


def wave_missing_exactly(swarm: Any, expected: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    tree: dict[str, Any] = swarm.tree()
    took = time.monotonic() - started
    assert not tree["complete"], tree
    assert sorted(tree["missing"]) == expected, tree["missing"]
    assert tree["duration_s"] <= WAVE_TIMEOUT_S + 0.5, tree["duration_s"]
    assert took <= WAVE_TIMEOUT_S + CLIENT_SLACK_S, took
    return tree


def finn_misses_exactly(swarm: Any, topology: Topology, expected: list[str]) -> None:
    started = time.monotonic()
    answer = swarm.post("/api/finn", {"tasks_per_node": 1})
    took = time.monotonic() - started
    # The whole answer in the message (pytest's own repr of a dict is cut short).
    assert answer["complete"] is False, json.dumps(answer)
    assert sorted(set(topology.names) - set(answer["decided"])) == expected, json.dumps(answer)
    assert answer["duration_s"] <= WAVE_TIMEOUT_S + 0.5, answer
    assert took <= WAVE_TIMEOUT_S + CLIENT_SLACK_S, took


def rebalance_avoids(swarm: Any, created: set[str], donor: str, cut_off: list[str]) -> None:
    """Load `donor`, rebalance: moves happen, none to or from a cut-off server."""
    submit(swarm, created, donor, 24)
    answer = swarm.post("/api/rebalance", {}, timeout=120)
    assert answer["moves"], answer
    touched = {m["source"] for m in answer["moves"]} | {m["target"] for m in answer["moves"]}
    assert not touched & set(cut_off), answer["moves"]


def complete_after_heal(swarm: Any, topology: Topology, what: str) -> dict[str, Any]:
    started = time.monotonic()
    tree: dict[str, Any] = swarm.wait_for(
        "a complete Echo after the heal", swarm.complete_tree, HEAL_TIMEOUT_S, every=2
    )
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(topology.names)
    swarm.notes.append(f"{what}: complete again after {time.monotonic() - started:.0f} s")
    return tree


# --- 1. the stack across three hosts ------------------------------------------------------


def test_every_server_runs_on_its_host(swarm: Any, topology: Topology) -> None:
    assert {swarm.placement[n] for n in topology.names} == {1, 2, 3}
    for server in topology.names:
        swarm.container(server)  # exactly one container, on the host the render chose
    for host in (2, 3):
        assert all(not topology.children(n) for n in swarm.servers_on(host)), "leaves only"


def test_echo_is_complete_across_hosts(swarm: Any, topology: Topology) -> None:
    tree = swarm.wait_for("a complete Echo", swarm.complete_tree, 60)
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(topology.names)
    assert {(e["source"], e["target"]) for e in tree["edges"]} == set(topology.edges)
    assert tree["messages"] == 2 * (len(topology.edges) + 1)


def test_finn_gives_every_server_exactly_its_share(swarm: Any, topology: Topology) -> None:
    def work(tree: dict[str, Any]) -> dict[str, int]:
        return {n["name"]: n["queued"] + n["running"] + n["completed"] for n in tree["nodes"]}

    before = work(swarm.wait_for("a complete Echo", swarm.complete_tree, 60))
    answer = swarm.post("/api/finn", {"tasks_per_node": 3})
    assert answer["complete"] is True, answer
    assert sorted(answer["decided"]) == sorted(topology.names)
    after = work(swarm.wait_for("a complete Echo", swarm.complete_tree, 60))
    assert {n: after[n] - before[n] for n in before} == dict.fromkeys(before, 3)


def test_prometheus_scrapes_every_server_across_hosts(swarm: Any, topology: Topology) -> None:
    def all_up() -> dict[str, str] | None:
        targets = swarm.prometheus("/api/v1/targets")["data"]["activeTargets"]
        health = {t["labels"].get("server", t["labels"]["job"]): t["health"] for t in targets}
        servers = {n: health.get(n, "absent") for n in topology.names}
        return servers if set(servers.values()) == {"up"} else None

    swarm.wait_for("every server scraped", all_up, 60, every=2)


# --- 2. rebalancing across hosts ----------------------------------------------------------


def test_rebalancing_crosses_hosts_and_conserves_every_task(
    swarm: Any, topology: Topology, created: set[str]
) -> None:
    ids = submit(swarm, created, "ash", 30)  # host 2, one CPU slot
    answer = swarm.post("/api/rebalance", {}, timeout=120)
    assert answer["moves"], answer
    assert answer["max_pressure_after"] < answer["max_pressure_before"], answer
    crossing = [
        m for m in answer["moves"] if swarm.placement[m["source"]] != swarm.placement[m["target"]]
    ]
    assert crossing, f"no transfer crossed hosts: {answer['moves']}"
    swarm.notes.append(f"rebalance moves: {answer['moves']}")
    assert_every_task_once(swarm, created)
    places = swarm.task_places()
    moved = {t for t in ids if not places[t][0].startswith("ash:")}
    assert sum(m["tasks"] for m in answer["moves"] if m["source"] == "ash") == len(moved)


# --- 3. a host cut off the network --------------------------------------------------------


@pytest.mark.timeout(600)
def test_partitioned_host_is_missing_never_lost(
    swarm: Any, topology: Topology, created: set[str]
) -> None:
    cut_off = swarm.servers_on(3)
    swarm.wait_for("a complete Echo", swarm.complete_tree, 60)
    swarm.lab.partition(3, "off")
    try:
        wave_missing_exactly(swarm, cut_off)
        wave_missing_exactly(swarm, cut_off)
        finn_misses_exactly(swarm, topology, cut_off)
        rebalance_avoids(swarm, created, "bay", cut_off)
    finally:
        swarm.lab.partition(3, "on")
    complete_after_heal(swarm, topology, "partition of host 3 healed")
    assert_every_task_once(swarm, created)


# --- 4. a host's engine stopped -----------------------------------------------------------


@pytest.mark.timeout(600)
def test_stopped_engine_is_missing_never_lost(
    swarm: Any, topology: Topology, created: set[str]
) -> None:
    stopped = swarm.servers_on(2)
    swarm.wait_for("a complete Echo", swarm.complete_tree, 60)
    containers = [swarm.container(s) for s in stopped]
    pid = swarm.lab.dockerd_pid(2)
    swarm.lab.docker("pause", *containers, host=2)
    os.kill(pid, signal.SIGSTOP)
    try:
        wave_missing_exactly(swarm, stopped)
        finn_misses_exactly(swarm, topology, stopped)
        rebalance_avoids(swarm, created, "lime", stopped)
        time.sleep(15)  # long enough for the manager to see the node down
        wave_missing_exactly(swarm, stopped)
    finally:
        os.kill(pid, signal.SIGCONT)
        swarm.lab.docker("unpause", *containers, host=2)
    complete_after_heal(swarm, topology, "engine of host 2 thawed")
    assert_every_task_once(swarm, created)


# --- 5. any start order -------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_services_converge_in_any_start_order(
    swarm: Any, topology: Topology, created: set[str]
) -> None:
    manager = swarm.lab
    services = [f"{swarm.name}_{n}" for n in (*topology.names, "balancer")]
    manager.docker("service", "scale", "--detach", *(f"{s}=0" for s in services))
    swarm.wait_for(
        "every server and the balancer stopped",
        lambda: None if any(swarm_running(swarm, s) for s in services) else True,
        120,
        every=2,
    )
    # Reverse of the natural order: the balancer first, then leaves up to the root.
    order = ["balancer", *reversed(topology.names)]
    for name in order:
        manager.docker("service", "scale", "--detach", f"{swarm.name}_{name}=1")
        time.sleep(1)
    swarm.wait_for("every service healthy again", lambda: swarm.healthy() or None, 180, every=2)
    complete_after_heal(swarm, topology, "started in reverse order")
    assert_every_task_once(swarm, created)


def swarm_running(swarm: Any, service: str) -> bool:
    out = swarm.lab.docker(
        "service",
        "ps",
        service,
        "--filter",
        "desired-state=running",
        "--format",
        "{{.CurrentState}}",
    )
    return any(line.startswith("Running") for line in out.splitlines())


# --- 6. a re-deploy with a changed topology -----------------------------------------------


@pytest.mark.timeout(600)
def test_redeploy_with_an_added_server(swarm: Any, topology: Topology, created: set[str]) -> None:
    """A server appended to the topology file: `render` + `docker stack deploy` again rolls
    every service onto the new topology (new config names), the new server starts on the
    host its position gives it, and every existing server keeps its host and its queue.
    (Removing one is the next test's.)"""
    grown = Topology.parse(grown_topology())
    before = swarm.placement
    swarm.redeploy(grown)
    assert {n: swarm.placement[n] for n in before} == before
    created.add("sage:init:1")
    swarm.wait_for("every service healthy again", lambda: swarm.healthy() or None, 240, every=2)
    tree = complete_after_heal(swarm, grown, "re-deployed with one more server")
    assert "sage" in {n["name"] for n in tree["nodes"]}
    swarm.container("sage")
    assert_every_task_once(swarm, created)


def grown_topology() -> dict[str, Any]:
    servers = [dict(s) for s in TOPOLOGY["servers"]]
    yew = next(s for s in servers if s["name"] == "yew")
    yew["children"] = [*yew["children"], "sage"]
    servers.append({"name": "sage", "cpus": 2, "tasks": 1, "children": []})
    return {**TOPOLOGY, "servers": servers}


# --- 7. a re-deploy without a server: drained, then pruned -----------------------------------


@pytest.mark.timeout(900)
def test_redeploy_without_a_server_drains_it_then_prune_removes_it(
    swarm: Any, created: set[str]
) -> None:
    """`ivy` (host 3, third in the file) leaves the topology with tasks queued and running.
    Re-deployed without `--prune`, its service keeps running while the balancer (recreated
    with the new topology, its state in its volume) drains it into servers on other hosts:
    the running tasks after the grace, from scratch. Every server after it in the file keeps
    its host, so no queue is stranded in a volume on the wrong host."""
    removed, grace_s = "ivy", 2.0
    submit(swarm, created, removed, 12)
    held = swarm.node_tasks(removed)
    holding = len(held["queued"]) + len(held["running"])
    assert holding >= 12, held
    before = swarm.placement
    shrunk = Topology.parse(without_server(swarm.topology, removed, drain_grace_s=grace_s))
    started = time.monotonic()
    swarm.redeploy(shrunk)
    assert swarm.placement == before  # nobody moved, ivy remembered on its host

    def retired() -> dict[str, Any] | None:
        state: dict[str, Any] = swarm.get("/api/topology")
        migration = state["migration"]
        done = migration["state"] == "steady" and removed in migration.get("retired", {})
        return state if done and state["topology"] == shrunk.to_json_data() else None

    state = swarm.wait_for(f"{removed} drained and retired", retired, 300, every=2)
    took = time.monotonic() - started
    swarm.notes.append(f"{removed} ({holding} tasks) retired {took:.0f} s after the re-deploy")
    assert state["migration"]["retired"][removed]["moved"] == holding, state["migration"]
    left = swarm.node_tasks(removed)  # still running (no prune yet), and empty
    assert left["queued"] + left["running"] + left["reserved"] == [], left
    complete_after_heal(swarm, shrunk, f"re-deployed without {removed}")
    # What it completed before it left (its start-up task) is recorded only in its ledger,
    # which goes with its volume: completed there, and nowhere else.
    completed_there = set(left["completed"])
    assert completed_there, left
    assert not completed_there & swarm.task_places().keys()
    created -= completed_there
    assert_every_task_once(swarm, created)

    host = before[removed]
    swarm.deploy(prune=True)
    volume = f"{swarm.name}_state-{removed}"

    def volume_removed() -> bool | None:
        ps = swarm.lab.docker("ps", "-aq", "--filter", f"volume={volume}", host=host)
        if ps.split():
            return None  # the pruned service's container is still being removed
        if volume in swarm.lab.docker("volume", "ls", "-q", host=host).split():
            swarm.lab.docker("volume", "rm", volume, host=host)
        return True

    swarm.wait_for(f"{removed}'s container gone and its volume removed", volume_removed, 120)
    services = swarm.lab.docker("service", "ls", "--format", "{{.Name}}").split()
    assert f"{swarm.name}_{removed}" not in services, services
    assert sorted(s.removeprefix(f"{swarm.name}_") for s in services) == sorted(
        [*shrunk.names, "balancer", "prometheus"]
    )
    complete_after_heal(swarm, shrunk, f"{removed} pruned")
    assert_every_task_once(swarm, created)


def without_server(topology: Topology, removed: str, **settings: Any) -> dict[str, Any]:
    data = topology.to_json_data()
    return {
        **data,
        "settings": {**data.get("settings", {}), **settings},
        "servers": [
            {**s, "children": [c for c in s["children"] if c != removed]}
            for s in data["servers"]
            if s["name"] != removed
        ],
    }
