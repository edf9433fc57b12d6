"""A server killed right before or right after each commit of its task store.

TREEWAVE_TEST_CRASH_AT=POINT:before|after (test-only, `node.store`) makes a server exit
hard just before or just after the SQLite commit of one operation: a submission, a Finn
decision, each transfer step (prepare, deliver, commit, abort) and a drain request. Before
the commit nothing of the operation is stored and nothing was acknowledged; after it the
operation is stored but its acknowledgement never left. Each crashed server is restarted
without the switch, with the same state directory, and the cluster is left to settle.

Checked per task id, while it settles and at the end: no id is in two live places
across the cluster nor reserved twice; nothing acknowledged is missing (at the end every
created id is completed exactly once, the completion counters add up); and an operation
interrupted before its commit left nothing behind, one interrupted after it left all of
its effect (a whole batch, a server's whole Finn share, the transfer's one outcome).
"""

from __future__ import annotations

import contextlib
import urllib.error
from dataclasses import dataclass
from typing import Any

import pytest

from treewave.node.store import CRASH_ENV

from .conftest import StartFaultCluster
from .support import CRASH_EXIT_CODE, FaultCluster, TaskBook, drained, wait_for

DONOR = "bravo"
RECIPIENT = "charlie"
BATCH = 8
TASK_S = 0.5
FINN_PER_NODE = 3

TOPOLOGY: dict[str, Any] = {
    "settings": {
        "task_time_s": 0.3,
        "rebalance_interval_s": 0,
        "overload_percent": 100.0,
        "wave_timeout_s": 2.0,
        "drain_grace_s": 5.0,
    },
    "servers": [
        {"name": "alpha", "cpus": 1, "tasks": 1, "children": [DONOR, RECIPIENT]},
        {"name": DONOR, "cpus": 2, "tasks": 1, "children": []},
        {"name": RECIPIENT, "cpus": 8, "tasks": 2, "children": []},
    ],
}
WITHOUT_DONOR: dict[str, Any] = {
    "settings": TOPOLOGY["settings"],
    "servers": [
        {"name": "alpha", "cpus": 1, "tasks": 1, "children": [RECIPIENT]},
        {"name": RECIPIENT, "cpus": 8, "tasks": 2, "children": []},
    ],
}


@dataclass(frozen=True)
class Case:
    server: str
    """Who crashes at the commit point."""
    trigger: str
    """What makes it reach the point: submit, finn, rebalance or drain."""
    moved: bool | None = None
    """For transfers: whether the tasks end up with the recipient (commit) or go back."""
    recipient_refuses: bool = False
    """The recipient dies before `deliver` (the older TREEWAVE_CRASH switch), so the
    coordinator aborts: the only way to reach the donor's abort."""


CASES: dict[str, Case] = {
    "submit": Case(DONOR, "submit"),
    "finn": Case(DONOR, "finn"),
    "prepare": Case(DONOR, "rebalance", moved=False),
    "deliver": Case(RECIPIENT, "rebalance"),
    "commit": Case(DONOR, "rebalance", moved=True),
    "abort": Case(DONOR, "rebalance", moved=False, recipient_refuses=True),
    "drain": Case(DONOR, "drain"),
}
POINTS = [(point, when) for point in CASES for when in ("before", "after")]


def serving(cluster: FaultCluster, name: str) -> bool:
    try:
        cluster.node_tasks(name)
    except OSError:
        return False
    return True


def checked(cluster: FaultCluster, book: TaskBook) -> dict[str, dict[str, Any]]:
    """A snapshot of the servers that are up, with no conservation problem."""
    snap = cluster.snapshot()
    problems = book.check(snap)
    assert not problems, problems
    return snap


def sampler(cluster: FaultCluster, book: TaskBook) -> Any:
    def sample() -> None:
        with contextlib.suppress(OSError):  # a server went down between two calls
            checked(cluster, book)

    return sample


def unacknowledged(snap: dict[str, dict[str, Any]], book: TaskBook) -> set[str]:
    return {
        tid
        for tasks in snap.values()
        for place in ("queued", "running", "reserved", "completed")
        for tid in tasks[place]
        if tid not in book.created
    }


@pytest.mark.parametrize(("point", "when"), POINTS, ids=[f"{p}-{w}" for p, w in POINTS])
def test_nothing_acknowledged_is_lost_and_nothing_doubles_across_a_crash_at_a_commit(
    fault_cluster: StartFaultCluster, point: str, when: str
) -> None:
    case = CASES[point]
    env = {case.server: {CRASH_ENV: f"{point}:{when}"}}
    if case.recipient_refuses:
        env[RECIPIENT] = {"TREEWAVE_CRASH": "before:transfer.deliver"}
    cluster = fault_cluster(TOPOLOGY, env=env)
    book = TaskBook()
    book.add_initial(TOPOLOGY)
    sample = sampler(cluster, book)

    if case.trigger == "submit":
        try:
            cluster.submit(DONOR, BATCH, TASK_S)
        except (urllib.error.HTTPError, OSError):
            pass  # not acknowledged: the server died before answering
        else:
            raise AssertionError("the submission was acknowledged by a server that crashed")
    elif case.trigger == "finn":
        result = cluster.finn(FINN_PER_NODE, TASK_S)
        book.add_finn(result["wave_id"], FINN_PER_NODE)
        assert DONOR not in result["decided"], result
    else:
        batch = book.add_submitted(cluster.submit(DONOR, BATCH, TASK_S))
        wait_for(
            "the batch queued at the donor",
            lambda: set(batch) & set(cluster.node_tasks(DONOR)["queued"]),
        )
        if case.trigger == "rebalance":
            cluster.rebalance()
        else:
            cluster.api("/api/topology", "POST", WITHOUT_DONOR)

    if case.recipient_refuses:
        # The coordinator aborts at the donor once the recipient, back, has pinned the
        # transfer as cancelled.
        assert cluster.wait_crash(RECIPIENT) == CRASH_EXIT_CODE
        cluster.restart(RECIPIENT, wait=False)
        wait_for(f"{RECIPIENT} to serve again", lambda: serving(cluster, RECIPIENT))
    code = cluster.wait_crash(case.server)
    assert code == CRASH_EXIT_CODE, f"{case.server} exited {code}, not at {point}:{when}"
    # A server leaving the topology is not counted among the balancer's links.
    cluster.restart(case.server, wait=case.trigger != "drain")
    wait_for(f"{case.server} to serve again", lambda: serving(cluster, case.server))
    snap = cluster.snapshot()

    # All or nothing of the interrupted operation, as its commit went.
    if case.trigger == "submit":
        found = unacknowledged(snap, book)
        if when == "before":
            assert not found, found
        else:
            batch_ids = {tid.rsplit(".", 1)[0] for tid in found}
            assert len(found) == BATCH, found  # the whole batch, of one submission
            assert len(batch_ids) == 1, found
            book.created |= found  # stored, so it must now run exactly once
    elif case.trigger == "finn":
        share = [t for place in ("queued", "running", "completed") for t in snap[DONOR][place]]
        mine = [t for t in share if t.split(":")[1] in book.finn_waves]
        assert len(mine) == (0 if when == "before" else FINN_PER_NODE), mine
    elif case.trigger == "drain":
        held = cluster.node_state(DONOR)["held"]
        assert held or when == "before"  # the hold, once committed, survives the restart
    problems = book.check(snap)
    assert not problems, problems

    wait_for(
        "every transfer settled and the cluster drained",
        lambda: cluster.balancer_status()["in_doubt"] == 0 and drained(cluster.snapshot()),
        timeout=120,
        on_poll=sample,
    )
    final = cluster.snapshot()
    problems = book.check(final, final=True)
    assert not problems, problems
    if case.moved is not None:
        taken_in = cluster.node_state(RECIPIENT)["transferred_in"]
        assert (taken_in > 0) == case.moved, taken_in
    if case.trigger == "drain":
        wait_for(
            f"{DONOR} retired",
            lambda: DONOR in cluster.api("/api/topology")["migration"]["retired"],
            timeout=60,
        )
