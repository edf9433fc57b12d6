"""Echo and Finn waves with a server killed (-9), crashed mid-wave, or frozen (SIGSTOP).

The cluster is the ten-server DAG of the default topology (fjord has two parents, so a
dead `birch` cuts off `ember` but not `fjord` from the Echo; in Finn everything below
birch waits for it). Waves have a 2 s deadline. Guarantees checked:

- with a server down, a wave ends *partial* within its deadline (the balancer's measured
  duration, plus slack for a loaded machine), naming exactly the dead server and the
  servers only reachable through it; Finn's `decided` excludes it and everything that
  needs to hear from it;
- after the server is restarted from its state directory (or thawed), Echo and Finn are
  complete again;
- every task (initial ones, Finn's) is in one place and is completed exactly once.
"""

from __future__ import annotations

import copy
from typing import Any

from .conftest import StartFaultCluster
from .support import (
    CRASH_EXIT_CODE,
    FaultCluster,
    TaskBook,
    drained,
    echo_missing,
    finn_missing,
    wait_for,
)

WAVE_TIMEOUT_S = 2.0
SLACK_S = 1.0
"""How late past its deadline a wave may end: timers tick every 20-50 ms, but this
machine is shared and can stall a process for a while."""
VICTIM = "birch"
FINN_TASK_S = 0.2
PARTIAL_ATTEMPTS = 3
"""Waves tried with a server down until one names exactly who is cut off (each normally
does; a live server stalled past its share of the deadline would be named too)."""
RECOVERY_ATTEMPTS = 5
"""Waves tried after recovery until one is complete (each normally is at once; a server
stalled by the machine for longer than its share of the deadline would miss one)."""

TOPOLOGY: dict[str, Any] = {
    "settings": {
        "task_time_s": 0.3,
        "rebalance_interval_s": 0,
        "overload_percent": 100.0,
        "wave_timeout_s": WAVE_TIMEOUT_S,
    },
    "servers": [
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
    ],
}
ALL = {s["name"] for s in TOPOLOGY["servers"]}


def assert_partial_echo(cluster: FaultCluster, dead: set[str]) -> None:
    """Echo ends partial within its deadline, naming exactly who is cut off. Every wave
    must name at least those; a wave that also misses a live server stalled by the
    machine is retried (see PARTIAL_ATTEMPTS)."""
    expected = echo_missing(TOPOLOGY, dead)
    assert expected > dead  # the topology cuts someone else off too
    seen = []
    for _ in range(PARTIAL_ATTEMPTS):
        tree = cluster.tree()
        assert not tree["complete"], tree
        assert set(tree["missing"]) >= expected, tree["missing"]
        assert tree["duration_s"] <= WAVE_TIMEOUT_S + SLACK_S, tree["duration_s"]
        assert {n["name"] for n in tree["nodes"]} == ALL - set(tree["missing"])
        seen.append(tree["missing"])
        if set(tree["missing"]) == expected:
            return
    raise AssertionError(f"expected exactly {sorted(expected)} missing, got {seen}")


def assert_partial_finn(
    cluster: FaultCluster, book: TaskBook, dead: set[str]
) -> list[dict[str, Any]]:
    """Finn ends partial within its deadline; `decided` excludes the dead and everything
    that must hear from them, and each server in it holds its share of the work. Returns
    the partial waves' results."""
    expected = finn_missing(TOPOLOGY, dead)
    seen = []
    results = []
    for _ in range(PARTIAL_ATTEMPTS):
        result = cluster.finn(1, FINN_TASK_S)
        book.add_finn(result["wave_id"], 1)
        assert not result["complete"], result
        assert not expected & set(result["decided"]), result["decided"]
        assert set(result["missing"]) == ALL - set(result["decided"])
        assert result["duration_s"] <= WAVE_TIMEOUT_S + SLACK_S, result["duration_s"]
        problems = book.check_finn(cluster.snapshot(), result["wave_id"], result["decided"])
        assert not problems, problems
        seen.append(result["missing"])
        results.append(result)
        if set(result["missing"]) == expected:
            return results
    raise AssertionError(f"expected exactly {sorted(expected)} missing, got {seen}")


def assert_recovered(cluster: FaultCluster, book: TaskBook) -> None:
    """Echo, then Finn, complete again (the first one normally; see RECOVERY_ATTEMPTS)."""
    trees = []
    for _ in range(RECOVERY_ATTEMPTS):
        trees.append(cluster.tree())
        if trees[-1]["complete"]:
            break
    assert trees[-1]["complete"], [t["missing"] for t in trees]
    assert {n["name"] for n in trees[-1]["nodes"]} == ALL
    finns = []
    for _ in range(RECOVERY_ATTEMPTS):
        finns.append(cluster.finn(1, FINN_TASK_S))
        book.add_finn(finns[-1]["wave_id"], 1)
        if finns[-1]["complete"]:
            break
    assert finns[-1]["complete"], [f["missing"] for f in finns]
    assert set(finns[-1]["decided"]) == ALL
    snapshot = cluster.snapshot()
    for f in finns:
        problems = book.check_finn(snapshot, f["wave_id"], f["decided"])
        assert not problems, problems


def assert_conserved(cluster: FaultCluster, book: TaskBook) -> None:
    def sample() -> None:
        assert not book.check(cluster.snapshot()), book.check(cluster.snapshot())

    wait_for("the cluster to drain", lambda: drained(cluster.snapshot()), 60, on_poll=sample)
    problems = book.check(cluster.snapshot(), final=True)
    assert not problems, problems


def new_book() -> TaskBook:
    book = TaskBook()
    book.add_initial(TOPOLOGY)
    return book


def test_killed_server_makes_waves_partial_until_restarted(
    fault_cluster: StartFaultCluster,
) -> None:
    cluster = fault_cluster(copy.deepcopy(TOPOLOGY), wave_timeout_s=WAVE_TIMEOUT_S)
    book = new_book()
    assert_recovered(cluster, book)  # a healthy baseline

    cluster.kill(VICTIM)
    assert_partial_echo(cluster, {VICTIM})
    assert_partial_finn(cluster, book, {VICTIM})

    cluster.restart(VICTIM)
    assert_recovered(cluster, book)
    assert_conserved(cluster, book)


def test_server_dying_in_the_middle_of_a_wave(fault_cluster: StartFaultCluster) -> None:
    """Crash points kill the server exactly mid-wave: on the explore it was sent, and just
    after it decided in a Finn wave (its share queued and persisted) but before it told
    anyone. The second one is also the regression test for a server that acknowledged a
    Finn decision before its new tasks were on disk: after the restart they are there."""
    env = {VICTIM: {"TREEWAVE_CRASH": "before:echo.explore"}}
    cluster = fault_cluster(copy.deepcopy(TOPOLOGY), env=env, wave_timeout_s=WAVE_TIMEOUT_S)
    book = new_book()

    assert_partial_echo(cluster, {VICTIM})
    assert cluster.wait_crash(VICTIM) == CRASH_EXIT_CODE

    cluster.restart(VICTIM, env={"TREEWAVE_CRASH": "after:finn"})
    result = cluster.finn(1, FINN_TASK_S)
    wave = result["wave_id"]
    book.add_finn(wave, 1)
    assert not result["complete"]
    assert set(result["missing"]) >= finn_missing(TOPOLOGY, {VICTIM})
    assert result["duration_s"] <= WAVE_TIMEOUT_S + SLACK_S, result["duration_s"]
    assert cluster.wait_crash(VICTIM) == CRASH_EXIT_CODE

    cluster.restart(VICTIM)
    problems = book.check_finn(cluster.snapshot(), wave, [*result["decided"], VICTIM])
    assert not problems, problems
    assert_recovered(cluster, book)
    assert_conserved(cluster, book)


def test_frozen_server_makes_waves_partial_until_thawed(
    fault_cluster: StartFaultCluster,
) -> None:
    cluster = fault_cluster(copy.deepcopy(TOPOLOGY), wave_timeout_s=WAVE_TIMEOUT_S)
    book = new_book()

    cluster.pause(VICTIM)
    cluster.down.add(VICTIM)  # its HTTP API is frozen too: leave it out of snapshots
    try:
        assert_partial_echo(cluster, {VICTIM})
        partial = assert_partial_finn(cluster, book, {VICTIM})
    finally:
        cluster.resume(VICTIM)
        cluster.down.discard(VICTIM)

    # Thawed, it works through what queued up meanwhile: the stale wave messages are
    # answered or dropped, and the next waves are complete.
    cluster.wait_ready()
    assert_recovered(cluster, book)
    # The partial waves' messages reached the thawed server after the waves expired: it
    # must not do work the balancer reported as not done (so a client may resubmit it).
    snapshot = cluster.snapshot()
    for result in partial:
        held = {
            tid.split(":")[0]
            for tasks in snapshot.values()
            for place in ("queued", "running", "reserved", "completed")
            for tid in tasks[place]
            if tid.split(":")[1:2] == [result["wave_id"]]
        }
        assert not held & set(result["missing"]), (result["wave_id"], held)
    assert_conserved(cluster, book)
