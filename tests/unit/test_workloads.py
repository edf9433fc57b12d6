"""The benchmark's workload generator is deterministic and its lower bound is right."""

from __future__ import annotations

import pytest

from treewave.experiment.workloads import DURATIONS, KINDS, Batch, Workload, all_workloads, make

SERVERS = {"aurora": 4, "birch": 2, "cedar": 1, "delta": 3, "ember": 1, "fjord": 2}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("durations", DURATIONS)
def test_same_seed_same_workload(kind: str, durations: str) -> None:
    a = make(kind, durations, SERVERS, seed=3)
    b = make(kind, durations, dict(reversed(list(SERVERS.items()))), seed=3)
    assert a == b
    assert a.tasks > 0
    assert all(x.node in SERVERS and x.count > 0 and x.duration_s > 0 for x in a.batches)


@pytest.mark.parametrize("kind", ["wrong", "stream"])
def test_extra_kinds_are_deterministic_and_varied_only(kind: str) -> None:
    a = make(kind, "varied", SERVERS, seed=3)
    assert a == make(kind, "varied", dict(reversed(list(SERVERS.items()))), seed=3)
    with pytest.raises(ValueError, match="durations"):
        make(kind, "fixed", SERVERS)


def test_wrong_declarations_are_off_by_at_most_half() -> None:
    w = make("wrong", "varied", SERVERS, seed=0)
    ratios = [b.actual_s / b.duration_s for b in w.batches if b.actual_s is not None]
    assert len(ratios) == w.tasks
    assert all(0.49 <= r <= 1.51 for r in ratios)
    assert max(ratios) > 1.3
    assert min(ratios) < 0.7
    # The lower bound counts the real work, not the declared.
    assert w.work_s == pytest.approx(sum(b.count * b.actual_s for b in w.batches if b.actual_s))


def test_stream_spreads_arrivals_over_a_longer_period() -> None:
    w = make("stream", "varied", SERVERS, seed=0, target_s=4.0)
    times = sorted({b.at_s for b in w.batches})
    assert times[0] == 0.0
    assert times[-1] >= 5.0
    assert len(times) >= 10


def test_seeds_differ() -> None:
    assert make("zipf", "varied", SERVERS, seed=1) != make("zipf", "varied", SERVERS, seed=2)


def test_shapes() -> None:
    skewed = make("skewed", "fixed", SERVERS, seed=0, hot=2)
    assert len({b.node for b in skewed.batches}) == 2
    assert {b.at_s for b in skewed.batches} == {0.0}
    bursts = make("bursts", "varied", SERVERS, seed=0, bursts=3, burst_gap_s=1.0)
    assert {b.at_s for b in bursts.batches} == {0.0, 1.0, 2.0}
    fixed = make("zipf", "fixed", SERVERS, seed=0)
    assert {b.duration_s for b in fixed.batches} == {0.5}


def test_size_follows_target() -> None:
    cpus = sum(SERVERS.values())
    for w in all_workloads(SERVERS, seed=5, target_s=4.0):
        assert 3.0 <= w.work_s / cpus <= 5.0, w.name


def test_lower_bound() -> None:
    w = Workload("x", 0, (Batch(0.0, "a", 4, 1.0), Batch(0.0, "b", 1, 3.0)))
    assert w.lower_bound(2) == w.classic_bound(2) == 3.5
    assert w.lower_bound(100) == 3.0  # the longest task
    late = Workload("y", 0, (Batch(0.0, "a", 2, 1.0), Batch(5.0, "b", 4, 1.0)))
    assert late.lower_bound(2) == 7.0  # the late batch alone needs 2 s after t = 5
    assert late.classic_bound(2) == 3.0


def test_arrivals_group_batches_by_time_in_submission_order() -> None:
    a, b, c, d = (
        Batch(at, name, 1, 1.0) for name, at in zip("abcd", [0.0, 1.5, 0.0, 1.5], strict=True)
    )
    assert Workload("x", 0, (a, b, c, d)).arrivals() == [(0.0, (a, c)), (1.5, (b, d))]
    w = make("stream", "varied", SERVERS, seed=0)
    arrivals = w.arrivals()
    assert [at for at, _ in arrivals] == sorted({x.at_s for x in w.batches})
    assert [x for _, group in arrivals for x in group] == sorted(w.batches, key=lambda x: x.at_s)


def test_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        make("nope", "fixed", SERVERS)
    with pytest.raises(ValueError, match="durations"):
        make("zipf", "nope", SERVERS)
