"""Every built-in policy on random snapshots, through the registry as the balancer and
`treewave experiment` choose them: the queued tasks are conserved (the multiset of queued
durations over the cluster; a move by count takes the donor's last queued tasks), running
tasks never move, every move is between two different known servers and takes only tasks
its donor has queued. Plus each policy's own rule on small hand-made cases. (`lpt`'s
bounds are in test_policy.py.)"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.policies import check_applied
from treewave.core.policies import get_policy, policy_names
from treewave.core.policies_builtin import LabPolicy, StealPolicy, plan_by_count
from treewave.core.policy import Load, Move, apply_moves
from treewave.core.topology import Settings

durations = st.sampled_from([0.1, 0.2, 0.5, 1.0, 1.5, 2.0]) | st.floats(0.01, 3)
BUILTIN = ["lpt", "count", "lab", "steal"]


@st.composite
def snapshots(draw: st.DrawFn) -> list[Load]:
    n = draw(st.integers(0, 8))
    out = []
    for i in range(n):
        cpus = draw(st.integers(1, 5))
        running = draw(st.lists(st.floats(0, 2, allow_nan=False), max_size=cpus))
        queued = draw(st.lists(durations, max_size=25))
        out.append(Load(f"s{i}", cpus, tuple(running), tuple(queued)))
    return out


def test_every_builtin_is_registered_with_a_description() -> None:
    assert policy_names()[:4] == BUILTIN
    for name in BUILTIN:
        policy = get_policy(name)
        assert policy.name == name
        assert policy.description


@pytest.mark.parametrize("name", BUILTIN)
@settings(max_examples=120, deadline=None)
@given(
    loads=snapshots(),
    overload=st.sampled_from([50.0, 100.0, 150.0]),
)
def test_conservation_running_tasks_stay_known_servers_only(
    name: str, loads: list[Load], overload: float
) -> None:
    moves = get_policy(name).plan(loads, Settings(overload_percent=overload))
    names = {x.name for x in loads}
    by = {x.name: x for x in loads}
    taken: Counter[str] = Counter()
    for m in moves:
        assert m.source in names, f"unknown source {m.source}"
        assert m.target in names, f"unknown target {m.target}"
        assert m.source != m.target
        assert m.tasks >= 1
        taken[m.source] += m.tasks
    for source, k in taken.items():
        assert k <= len(by[source].queued), f"{source} gave more than it had queued"
    check_applied(loads, moves)


@settings(max_examples=120, deadline=None)
@given(loads=snapshots())
def test_count_evens_task_counts_and_never_makes_the_busiest_busier(loads: list[Load]) -> None:
    after = apply_moves(loads, plan_by_count(loads))

    def worst(xs: list[Load]) -> float:
        return max(((len(x.running_left) + len(x.queued)) / x.cpus for x in xs), default=0.0)

    assert worst(after) <= worst(loads) + 1e-9


def test_count_moves_name_counts_not_durations() -> None:
    loads = [Load("a", 1, (), (5.0, 0.1, 0.1, 0.1)), Load("b", 1, (), ())]
    assert plan_by_count(loads) == [Move.by_count("a", "b", 2)]


def test_lab_gives_one_task_per_overloaded_server_to_the_most_free_cpu() -> None:
    loads = [
        Load("hot", 2, (1.0, 1.0), (1.0,) * 6),  # load 8 on 2 cpus: overloaded
        Load("warm", 2, (1.0, 1.0), (1.0,) * 2),  # load 4 on 2 cpus: overloaded
        Load("idle4", 4, (), ()),  # 4 free cpus
        Load("idle1", 1, (), ()),  # 1 free cpu
    ]
    moves = LabPolicy().plan(loads, Settings())
    # hot (most loaded per cpu) first, to idle4; then warm to idle4 (3 free, still most).
    assert sorted(moves, key=lambda m: m.source) == [
        Move.by_count("hot", "idle4", 1),
        Move.by_count("warm", "idle4", 1),
    ]


def test_lab_threshold_is_overload_percent_of_the_cpus() -> None:
    loads = [Load("a", 4, (1.0, 1.0), (1.0,)), Load("b", 4, (), ())]  # load 3 of 4 cpus
    assert LabPolicy().plan(loads, Settings(overload_percent=100)) == []
    assert LabPolicy().plan(loads, Settings(overload_percent=75)) == [Move.by_count("a", "b", 1)]


def test_lab_needs_a_server_with_free_cpu() -> None:
    loads = [Load("a", 1, (1.0,), (1.0, 1.0)), Load("b", 1, (1.0,), ())]
    assert LabPolicy().plan(loads, Settings()) == []


def test_steal_only_idle_servers_receive_from_the_most_occupied() -> None:
    loads = [
        Load("big", 1, (1.0,), (2.0, 2.0, 1.0, 1.0)),  # occupancy 7
        Load("mid", 1, (1.0,), (1.0, 1.0)),  # occupancy 3
        Load("free", 2, (), ()),  # idle
    ]
    moves = StealPolicy().plan(loads, Settings())
    assert moves, "the idle server steals"
    assert {m.target for m in moves} == {"free"}
    assert moves[0].source == "big"
    # Dask's rule: occ(thief) + d <= occ(victim) - d / 2, updated after each steal.
    assert moves[0].durations is not None
    assert moves[0].durations[0] == 2.0


def test_steal_does_nothing_when_nobody_is_idle() -> None:
    loads = [Load("a", 1, (1.0,), (1.0, 1.0)), Load("b", 1, (1.0,), (1.0,))]
    assert StealPolicy().plan(loads, Settings()) == []
