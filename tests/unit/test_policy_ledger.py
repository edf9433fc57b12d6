"""What the policy relies on at the servers: queue order, reserving named durations, and
the one definition of expected work and pressure (`core.load`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from treewave.core.ledger import TaskLedger
from treewave.core.load import (
    duration_histogram,
    expected_work_s,
    load_level,
    pressure,
    pressure_of,
    queued_durations,
)
from treewave.core.messages import ServerState, Task, TransferPrepare, parse_message
from treewave.core.topology import Topology, TopologyError


def tasks(*durations: float, prefix: str = "t") -> list[Task]:
    return [Task(id=f"{prefix}{i}", duration_s=d) for i, d in enumerate(durations)]


def test_longest_first_keeps_submission_order_among_equal_durations() -> None:
    led = TaskLedger()
    led.submit(tasks(0.5, 1.5, 0.5, 1.5, 0.1, 0.5))
    order = [led.start_next(0.0) for _ in range(6)]
    assert [t.id for t in order if t is not None] == ["t1", "t3", "t0", "t2", "t5", "t4"]
    assert led.start_next() is None


def test_fifo_runs_in_submission_order() -> None:
    led = TaskLedger("fifo")
    led.submit(tasks(0.5, 1.5, 0.1))
    assert [t.id for t in led.queued] == ["t0", "t1", "t2"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([0.1, 0.5, 1.0, 2.0]), max_size=40))
def test_run_order_is_longest_first_and_stable(ds: list[float]) -> None:
    led = TaskLedger()
    for t in tasks(*ds):  # one at a time, like separate submissions
        led.submit([t])
    run = list(led.queued)
    assert [t.duration_s for t in run] == sorted(ds, reverse=True)
    for d in set(ds):
        ids = [int(t.id[1:]) for t in run if t.duration_s == d]
        assert ids == sorted(ids)


def test_prepare_by_durations_takes_the_closest_and_newest_and_abort_restores() -> None:
    led = TaskLedger()
    led.submit(tasks(1.5, 0.5, 0.5, 0.5, 0.2))
    before = [t.id for t in led.queued]
    res = led.prepare("x1", "b", 3, now=0.0, durations=(0.5, 1.4, 0.3))
    # 1.4 -> the 1.5 s task, 0.5 -> the newest 0.5 s task (t3), 0.3 -> 0.2 (closer than 0.5)
    assert sorted(t.id for t in res.tasks) == ["t0", "t3", "t4"]
    assert [t.id for t in led.queued] == ["t1", "t2"]
    assert led.prepare("x1", "b", 3, now=0.0, durations=(0.5, 1.4, 0.3)) is res  # idempotent
    assert led.abort("x1") == "aborted"
    assert [t.id for t in led.queued] == before


def test_prepare_by_durations_takes_no_more_than_is_queued() -> None:
    led = TaskLedger()
    led.submit(tasks(1.0))
    res = led.prepare("x", "b", 3, now=0.0, durations=(1.0, 1.0, 1.0))
    assert [t.id for t in res.tasks] == ["t0"]
    assert not led.queued


def test_running_left_counts_down_from_the_start() -> None:
    led = TaskLedger()
    led.submit(tasks(2.0, 0.5))
    led.start_next(10.0)
    led.start_next(10.0)
    assert led.running_left(10.5) == [1.5, 0.0]
    assert led.running_left(13.0) == [0.0, 0.0]


def test_restore_keeps_the_run_order() -> None:
    led = TaskLedger()
    led.submit(tasks(0.5, 1.5, 0.5))
    again = TaskLedger.from_json_data(led.to_json_data())
    assert [t.id for t in again.queued] == ["t1", "t0", "t2"]


def test_prepare_message_names_as_many_durations_as_tasks() -> None:
    ok = TransferPrepare(transfer="x", target="b", count=2, durations=(1.0, 0.5))
    assert parse_message(ok.model_dump_json()) == ok
    with pytest.raises(ValidationError, match="count 2 but 1 durations"):
        TransferPrepare(transfer="x", target="b", count=2, durations=(1.0,))
    # The old form (no durations) is still valid.
    assert parse_message('{"type":"transfer.prepare","transfer":"x","target":"b","count":1}')


def test_histogram_is_exact_for_few_durations_and_bounded_for_many() -> None:
    assert duration_histogram([0.5, 1.5, 0.5]) == ((1.5, 1), (0.5, 2))
    many = [0.1 + i * 0.0137 for i in range(1000)]
    hist = duration_histogram(many, max_buckets=16)
    assert len(hist) <= 16
    assert sum(c for _, c in hist) == 1000
    assert sum(d * c for d, c in hist) == pytest.approx(sum(many), rel=0.005)


def test_expected_work_and_pressure_are_one_definition() -> None:
    s = ServerState(
        name="a",
        cpus=4,
        running=2,
        queued=3,
        completed=0,
        running_left_s=(0.5, 1.0),
        queued_s=((2.0, 1), (1.0, 2)),
    )
    assert expected_work_s(s, task_time_s=9.0) == 5.5
    assert pressure(s, task_time_s=9.0) == pressure_of(5.5, 4) == 1.375
    assert queued_durations(s, 9.0) == [2.0, 1.0, 1.0]
    old = ServerState(name="a", cpus=2, running=1, queued=2, completed=0)
    assert expected_work_s(old, task_time_s=2.0) == 6.0


def test_queue_order_is_a_validated_topology_setting() -> None:
    servers = [{"name": "alpha", "cpus": 1}]
    assert Topology.parse({"servers": servers}).settings.queue_order == "longest-first"
    fifo = Topology.parse({"settings": {"queue_order": "fifo"}, "servers": servers})
    assert fifo.settings.queue_order == "fifo"
    with pytest.raises(TopologyError, match="queue_order"):
        Topology.parse({"settings": {"queue_order": "random"}, "servers": servers})


def test_every_queue_change_bumps_the_queue_version() -> None:
    led = TaskLedger()
    seen = [led.queue_version]

    def changed() -> None:
        assert led.queue_version != seen[-1]
        seen.append(led.queue_version)

    led.submit(tasks(1.0, 0.5, 2.0))
    changed()
    led.start_next(0.0)
    changed()
    led.prepare("x", "b", 1, now=0.0, durations=(0.5,))
    changed()
    led.abort("x")
    changed()
    led.prepare("y", "b", 1, now=0.0)
    changed()
    led.commit("y")
    assert led.queue_version == seen[-1]  # the queue itself did not change


@pytest.mark.parametrize(
    ("running", "queued", "cpus", "percent", "level"),
    [
        (0, 0, 4, 100, 0),
        (1, 0, 4, 100, 2),  # 25%
        (0, 1, 8, 100, 1),
        (2, 1, 4, 100, 4),  # 75%
        (4, 0, 4, 100, 5),  # exactly the threshold: overloaded
        (4, 9, 4, 100, 5),
        (2, 0, 4, 50, 5),  # a lower threshold overloads sooner
        (1, 0, 4, 200, 1),
    ],
)
def test_load_levels_colour_bands_by_tasks_per_cpu(
    running: int, queued: int, cpus: int, percent: float, level: int
) -> None:
    assert load_level(running, queued, cpus, percent) == level
