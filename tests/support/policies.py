"""What every balancing plan must leave true once applied, for the policy tests."""

from __future__ import annotations

from collections import Counter

from treewave.core.policy import Load, Move, apply_moves


def check_applied(loads: list[Load], moves: list[Move]) -> list[Load]:
    """Apply `moves` to `loads` and check the result: the same servers in the same order,
    their cpus and running tasks untouched, every queued task still somewhere."""
    by = {x.name: x for x in loads}
    after = apply_moves(loads, moves)
    assert [x.name for x in after] == [x.name for x in loads]
    for a in after:
        assert a.cpus == by[a.name].cpus
        assert a.running_left == by[a.name].running_left, "running tasks never move"
    assert Counter(d for x in after for d in x.queued) == Counter(
        d for x in loads for d in x.queued
    ), "queued tasks are conserved"
    return after
