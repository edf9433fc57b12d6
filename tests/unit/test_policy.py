"""The balancing policy on random snapshots.

What "good" means, exactly. Running tasks stay where they are and queued tasks may go
anywhere, so with total work W = sum(running + queued) the best achievable maximum
pressure is

    P* = min { P : running_i <= P * cpus_i for every i, and sum_i floor(P * cpus_i) >= W }

(water-filling: at pressure P server i holds at most floor(P * cpus_i) tasks; P* is found
exactly, with fractions, among the candidates k / cpus_i). A server's *ideal share* is
floor(P* * cpus_i), the most it can hold in an optimal placement.

The tests assert, after applying the planned moves:
- total work is conserved, running counts are untouched, queued counts stay >= 0, every
  move is of >= 1 task between two different known servers, and no server gives away
  more than it had queued;
- the maximum pressure never rises;
- every server's load is <= its ideal share + 1 (the requirement), and in fact <= its
  ideal share, so the maximum pressure equals P* (the greedy is optimal for unit tasks);
- planning again on the result moves nothing, and a snapshot that is already balanced
  (no single move lowers the donor without lifting the recipient to its level) gets no
  moves; empty and single-server snapshots get no moves.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from treewave.core.messages import ServerState
from treewave.core.policy import (
    Load,
    Move,
    apply_moves,
    imbalance,
    loads_of,
    max_pressure,
    plan_moves,
)


def ideal_pressure(loads: list[Load]) -> Fraction:
    """P*, exactly (see the module docstring)."""
    work = sum(x.running + x.queued for x in loads)
    floor = max(Fraction(x.running, x.cpus) for x in loads)

    def fits(p: Fraction) -> bool:
        return sum((p * x.cpus).__floor__() for x in loads) >= work

    cpus = {x.cpus for x in loads}
    candidates = sorted({Fraction(k, c) for c in cpus for k in range(work + 1)} | {floor})
    candidates = [p for p in candidates if p >= floor]
    lo, hi = 0, len(candidates) - 1
    assert fits(candidates[hi])
    while lo < hi:  # the first feasible candidate (feasibility is monotone in P)
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def exact_pressure(x: Load) -> Fraction:
    return Fraction(x.running + x.queued, x.cpus)


@st.composite
def snapshots(draw: st.DrawFn, min_size: int = 0, max_size: int = 12) -> list[Load]:
    n = draw(st.integers(min_size, max_size))
    return [
        Load(
            name=f"s{i}",
            cpus=draw(st.integers(1, 8)),
            running=draw(st.integers(0, 10)),
            queued=draw(st.integers(0, 40)),
        )
        for i in range(n)
    ]


def check_moves(loads: list[Load], moves: list[Move]) -> list[Load]:
    names = {x.name for x in loads}
    before = {x.name: x for x in loads}
    for m in moves:
        assert m.source in names
        assert m.target in names
        assert m.source != m.target
        assert m.tasks >= 1
    pairs = [(m.source, m.target) for m in moves]
    assert len(pairs) == len(set(pairs)), "one move per (source, target)"
    given_away = Counter[str]()
    for m in moves:
        given_away[m.source] += m.tasks
    for name, k in given_away.items():
        assert k <= before[name].queued, f"{name} gave {k} but had {before[name].queued} queued"
    after = apply_moves(loads, moves)
    assert [x.name for x in after] == [x.name for x in loads]
    for a in after:
        b = before[a.name]
        assert a.cpus == b.cpus
        assert a.running == b.running, "running tasks never move"
        assert a.queued >= 0
    assert sum(x.running + x.queued for x in after) == sum(x.running + x.queued for x in loads)
    return after


@settings(max_examples=300, deadline=None)
@given(loads=snapshots())
def test_plan_is_safe_and_optimal(loads: list[Load]) -> None:
    moves = plan_moves(loads)
    after = check_moves(loads, moves)
    if not loads:
        assert moves == []
        return
    assert max_pressure(after) <= max_pressure(loads)
    best = ideal_pressure(loads)
    for x in after:
        share = (best * x.cpus).__floor__()
        assert x.running + x.queued <= share + 1  # the stated requirement
        assert x.running + x.queued <= share, f"{x} above its ideal share {share}"
    assert max(exact_pressure(x) for x in after) == best
    # Planning again finds nothing to do.
    assert plan_moves(after) == []


@settings(max_examples=200, deadline=None)
@given(loads=snapshots(min_size=1))
def test_only_queued_tasks_move_from_the_most_pressed(loads: list[Load]) -> None:
    moves = plan_moves(loads)
    by = {x.name: x for x in loads}
    for m in moves:
        assert by[m.source].queued > 0
        # A recipient ends strictly below the donor's starting pressure: nobody is lifted
        # to the level the work came from.
        assert exact_pressure(by[m.target]) < exact_pressure(by[m.source])


def is_balanced(loads: list[Load]) -> bool:
    """No single move of one queued task lowers a donor without lifting the recipient
    to at least the donor's pressure."""
    return not any(
        d.queued > 0 and Fraction(r.running + r.queued + 1, r.cpus) < exact_pressure(d)
        for d in loads
        for r in loads
        if r.name != d.name
    )


@settings(max_examples=200, deadline=None)
@given(loads=snapshots(min_size=1))
def test_no_moves_when_already_balanced(loads: list[Load]) -> None:
    moves = plan_moves(loads)
    if is_balanced(loads):
        assert moves == []
    else:
        assert moves, "an unbalanced snapshot gets at least one move"
    assert is_balanced(apply_moves(loads, moves))


@settings(max_examples=100, deadline=None)
@given(
    cpus=st.integers(1, 8),
    per_cpu=st.integers(0, 5),
    running_share=st.integers(0, 5),
    n=st.integers(1, 10),
)
def test_equal_pressure_everywhere_means_no_moves(
    cpus: int, per_cpu: int, running_share: int, n: int
) -> None:
    total = cpus * per_cpu
    running = min(running_share, total)
    loads = [Load(f"s{i}", cpus, running, total - running) for i in range(n)]
    assert plan_moves(loads) == []


def test_empty_and_single_server_snapshots() -> None:
    assert plan_moves([]) == []
    assert plan_moves([Load("solo", 1, 5, 100)]) == []
    assert max_pressure([]) == 0.0
    assert imbalance([]) == 0.0


def test_queued_work_flows_to_idle_servers() -> None:
    loads = [Load("busy", 1, 1, 9), Load("idle", 4, 0, 0), Load("half", 2, 1, 0)]
    moves = plan_moves(loads)
    after = {x.name: x for x in check_moves(loads, moves)}
    # W = 11 over 7 cpus. P = 7/4 fits: floor(7/4) + floor(7) + floor(7/2) = 1 + 7 + 3 = 11,
    # and nothing below it does, so busy keeps only its running task.
    assert ideal_pressure(loads) == Fraction(7, 4)
    assert after["busy"] == Load("busy", 1, 1, 0)
    assert after["idle"].queued == 7
    assert after["half"].queued == 2
    assert sum(m.tasks for m in moves if m.source == "busy") == 9


def test_running_tasks_alone_can_set_the_floor() -> None:
    # Nothing is queued on the hot server, so nothing can move.
    loads = [Load("hot", 1, 8, 0), Load("cold", 8, 0, 0)]
    assert plan_moves(loads) == []
    assert ideal_pressure(loads) == 8


def test_max_moves_caps_the_plan() -> None:
    loads = [Load("busy", 1, 0, 50), Load("idle", 50, 0, 0)]
    moves = plan_moves(loads, max_moves=5)
    assert sum(m.tasks for m in moves) == 5
    check_moves(loads, moves)


def test_loads_of_and_imbalance() -> None:
    states = [
        ServerState(name="a", cpus=2, running=1, queued=3, completed=0),
        ServerState(name="b", cpus=2, running=0, queued=0, completed=5),
    ]
    loads = loads_of(states)
    assert loads == [Load("a", 2, 1, 3), Load("b", 2, 0, 0)]
    assert max_pressure(loads) == 2.0
    assert imbalance(loads) == 2.0 - 1.0
    assert imbalance(apply_moves(loads, plan_moves(loads))) == 0.0
