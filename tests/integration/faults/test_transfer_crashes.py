"""Two-phase transfers when a process dies at each step (real processes, crash points).

A donor (`bravo`, 2 CPUs) gets a batch of short tasks, the recipient (`charlie`, 8 CPUs) is
idle, and a rebalance moves queued tasks from one to the other. TREEWAVE_CRASH makes the
donor or the recipient exit hard just before or after handling (and persisting) one
transfer step, before it replies; the balancer may also be SIGKILLed while a transfer is in
doubt. Each crashed process is restarted without its crash point, with the same state
directory, and the cluster is left to settle and drain.

What is checked, per task id (every id the test created: the topology's `NAME:init:k`,
the submitted batch): while it settles, no id is ever in two live places (queued, running,
completed) across the cluster, nor reserved twice; at the end nothing is queued, running
or reserved, every id is completed exactly once, and the completion counters add up to
the ids created. A task that was running on a killed server runs again (at-least-once),
but its completion is counted once. And the transfer went the one way it could: tasks
the recipient acknowledged stay with it (commit), tasks it never took go back to the
donor (abort).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest

from .conftest import StartFaultCluster
from .support import BALANCER, CRASH_EXIT_CODE, FaultCluster, TaskBook, drained, wait_for

DONOR = "bravo"
RECIPIENT = "charlie"
BATCH = 10
TASK_S = 0.5

TOPOLOGY: dict[str, Any] = {
    "settings": {
        "task_time_s": 0.3,
        "rebalance_interval_s": 0,
        "overload_percent": 100.0,
        "wave_timeout_s": 2.0,
    },
    "servers": [
        {"name": "alpha", "cpus": 1, "tasks": 1, "children": [DONOR, RECIPIENT]},
        {"name": DONOR, "cpus": 2, "tasks": 1, "children": []},
        {"name": RECIPIENT, "cpus": 8, "tasks": 2, "children": []},
    ],
}


@dataclass(frozen=True)
class Case:
    crashes: tuple[tuple[str, str], ...]
    """(server, crash point) in the order they fire."""
    moved: bool
    """Whether the tasks end up with the recipient (commit) or back at the donor (abort)."""
    kill_balancer: bool = False
    """SIGKILL the balancer after the first crash, while the transfer is in doubt, and
    start it again only after the crashed servers are back."""


CASES = {
    "donor-after-prepare": Case(((DONOR, "after:transfer.prepare"),), moved=False),
    "recipient-before-deliver": Case(((RECIPIENT, "before:transfer.deliver"),), moved=False),
    "recipient-after-deliver": Case(((RECIPIENT, "after:transfer.deliver"),), moved=True),
    "donor-before-commit": Case(((DONOR, "before:transfer.commit"),), moved=True),
    "donor-after-commit": Case(((DONOR, "after:transfer.commit"),), moved=True),
    # An abort needs a recipient that never took the tasks: it dies before `deliver`.
    "donor-before-abort": Case(
        ((RECIPIENT, "before:transfer.deliver"), (DONOR, "before:transfer.abort")), moved=False
    ),
    "balancer-killed-donor-holding-reservation": Case(
        ((DONOR, "after:transfer.prepare"),), moved=False, kill_balancer=True
    ),
    "balancer-killed-recipient-accepted": Case(
        ((RECIPIENT, "after:transfer.deliver"),), moved=True, kill_balancer=True
    ),
}


def sampler(cluster: FaultCluster, book: TaskBook) -> Any:
    """A poll hook: snapshot the servers that are up and fail on any conservation
    problem (duplicates, double reservations, unknown ids)."""

    def sample() -> None:
        try:
            snap = cluster.snapshot()
        except OSError:
            return  # a server went down between the two calls: next poll
        problems = book.check(snap)
        assert not problems, problems

    return sample


def serving(cluster: FaultCluster, name: str) -> bool:
    try:
        cluster.node_tasks(name)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("case_id", list(CASES))
def test_transfer_survives_a_crash_at_each_step(
    fault_cluster: StartFaultCluster, case_id: str
) -> None:
    case = CASES[case_id]
    env: dict[str, dict[str, str]] = {}
    for server, point in case.crashes:
        env.setdefault(server, {})
        joined = ",".join(filter(None, [env[server].get("TREEWAVE_CRASH"), point]))
        env[server]["TREEWAVE_CRASH"] = joined
    cluster = fault_cluster(TOPOLOGY, env=env)
    book = TaskBook()
    book.add_initial(TOPOLOGY)
    sample = sampler(cluster, book)

    batch = book.add_submitted(cluster.submit(DONOR, BATCH, TASK_S))
    wait_for(
        "the batch to be queued at the donor",
        lambda: set(batch) & set(cluster.node_tasks(DONOR)["queued"]),
    )
    reports = []
    for _ in range(3):  # a server stalled by the machine may miss the snapshot: again
        reports.append(cluster.rebalance())
        if (DONOR, RECIPIENT) in {(m["source"], m["target"]) for m in reports[-1]["planned"]}:
            break
    else:
        raise AssertionError(f"no move from {DONOR} to {RECIPIENT} planned: {reports}")

    for i, (server, point) in enumerate(case.crashes):
        code = cluster.wait_crash(server)
        assert code == CRASH_EXIT_CODE, f"{server} exited {code}, expected its crash at {point}"
        if case.kill_balancer and i == 0:
            assert cluster.balancer_status()["in_doubt"] >= 1
            cluster.kill(BALANCER)
        sample()
        if i + 1 < len(case.crashes):
            # Another server is set to crash next, possibly while this one restarts (the
            # resolver retries on its own): wait only for this one to serve again.
            cluster.restart(server, wait=False)
            wait_for(f"{server} to serve again", partial(serving, cluster, server))
        else:
            cluster.restart(server)
            sample()
    if case.kill_balancer:
        # Only the reservation at the donor tells the new balancer about the transfer.
        cluster.restart(BALANCER)

    wait_for(
        "every transfer settled and the cluster drained",
        lambda: cluster.balancer_status()["in_doubt"] == 0 and drained(cluster.snapshot()),
        timeout=90,
        on_poll=sample,
    )
    final = cluster.snapshot()
    problems = book.check(final, final=True)
    assert not problems, problems

    at_recipient = set(batch) & set(final[RECIPIENT]["completed"])
    taken_in = cluster.node_state(RECIPIENT)["transferred_in"]
    if case.moved:
        assert at_recipient, "the recipient acknowledged the tasks; they must stay there"
        assert taken_in == len(at_recipient)
    else:
        assert not at_recipient, "the recipient never took the tasks; they go back"
        assert taken_in == 0
    assert cluster.node_state(DONOR)["in_doubt"] == []
