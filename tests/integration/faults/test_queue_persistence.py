"""A server killed -9 comes back from its state directory with its queue.

Queued tasks come back as they were; tasks that were running when it died are queued
again and re-run (at-least-once), and each is still counted completed exactly once.
"""

from __future__ import annotations

import json
import urllib.error
from typing import Any

import pytest

from .conftest import StartFaultCluster
from .support import CRASH_EXIT_CODE, FaultCluster, TaskBook, drained, wait_for

KEEPER = "keeper"
CPUS = 2
BATCH = 4
TASK_S = 4.0
"""Long enough that the re-run tasks are still running when the restarted server first
answers (it starts them before it listens), short enough to drain soon."""

TOPOLOGY: dict[str, Any] = {
    "settings": {
        "task_time_s": 0.2,
        "rebalance_interval_s": 0,
        "overload_percent": 100.0,
        "wave_timeout_s": 2.0,
    },
    "servers": [
        {"name": "root", "cpus": 1, "tasks": 0, "children": [KEEPER]},
        {"name": KEEPER, "cpus": CPUS, "tasks": 2, "children": []},
    ],
}


def test_killed_server_comes_back_with_its_queue(fault_cluster: StartFaultCluster) -> None:
    cluster = fault_cluster(TOPOLOGY)
    book = TaskBook()
    book.add_initial(TOPOLOGY)
    wait_for("the initial tasks to finish", lambda: drained(cluster.snapshot()))
    done_before = cluster.node_tasks(KEEPER)["completed"]

    batch = book.add_submitted(cluster.submit(KEEPER, BATCH, TASK_S))

    def both_running() -> dict[str, Any] | None:
        tasks = cluster.node_tasks(KEEPER)
        return tasks if len(set(tasks["running"]) & set(batch)) == CPUS else None

    before = wait_for("the batch to start", both_running)
    cluster.kill(KEEPER)
    assert set(before["running"]) | set(before["queued"]) == set(batch)

    cluster.restart(KEEPER, wait=False)

    def started_again() -> dict[str, Any] | None:
        tasks = cluster.node_tasks(KEEPER)
        return tasks if tasks["running"] else None

    after = wait_for("the restarted server to run tasks", started_again)
    # Everything that was queued or running is back, and nothing has completed twice:
    # what was running is queued or running again.
    assert set(after["queued"]) | set(after["running"]) == set(batch), after
    assert after["completed"] == done_before
    assert after["completed_count"] == len(done_before)
    # The restored order puts what was running first, so it runs again first.
    assert set(after["running"]) == set(before["running"]), (before, after)
    cluster.wait_ready()

    wait_for("the batch to complete", lambda: drained(cluster.snapshot()), timeout=90)
    final = cluster.snapshot()
    problems = book.check(final, final=True)
    assert not problems, problems
    assert final[KEEPER]["completed"][: len(done_before)] == done_before
    assert sorted(final[KEEPER]["completed"][len(done_before) :]) == sorted(batch)


def submit_error(cluster: FaultCluster, count: int) -> tuple[int, dict[str, Any]]:
    """POST /api/tasks expecting a refusal: (status, JSON body)."""
    with pytest.raises(urllib.error.HTTPError) as caught:
        cluster.submit(KEEPER, count, 0.2)
    with caught.value as answer:  # closes its socket (no ResourceWarning at collection)
        return answer.code, json.loads(answer.read())


def test_submitted_tasks_are_confirmed_only_once_queued(
    fault_cluster: StartFaultCluster,
) -> None:
    """POST /api/tasks answers 202 only when the server has the tasks on disk. A server
    that dies before handling the submission must not leave the client believing its
    tasks were queued (they were never anywhere: that was a loss); one that dies after
    queueing them but before confirming answers "not confirmed", naming the ids, which
    then turn out queued after its restart."""
    cluster = fault_cluster(TOPOLOGY, env={KEEPER: {"TREEWAVE_CRASH": "before:tasks.submit"}})
    book = TaskBook()
    book.add_initial(TOPOLOGY)

    status, body = submit_error(cluster, 3)
    assert status == 504, body
    assert "did not confirm" in body["error"]
    assert cluster.wait_crash(KEEPER) == CRASH_EXIT_CODE
    cluster.restart(KEEPER, env={"TREEWAVE_CRASH": "after:tasks.submit"})
    never = TaskBook().add_submitted({**body, "accepted": 3})
    found = book.placed(cluster.snapshot())
    assert not set(never) & set(found), "died before handling: nothing may be queued"

    status, body = submit_error(cluster, 3)
    assert status == 504, body
    assert cluster.wait_crash(KEEPER) == CRASH_EXIT_CODE
    cluster.restart(KEEPER)
    maybe = book.add_submitted({**body, "accepted": 3})
    assert set(maybe) <= set(book.placed(cluster.snapshot())), "queued before the crash"

    book.add_submitted(cluster.submit(KEEPER, 3, 0.2))  # and now simply 202
    wait_for("the tasks to complete", lambda: drained(cluster.snapshot()), timeout=60)
    problems = book.check(cluster.snapshot(), final=True)
    assert not problems, problems
