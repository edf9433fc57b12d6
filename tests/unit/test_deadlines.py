"""The wave deadline grows with the tree (core/deadlines.py): the rule itself, and that a
large tree on a slow machine completes its waves under it where the fixed setting would
have cut them off."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from treewave.core.deadlines import (
    BASE_S,
    MAX_WAVE_DEADLINE_S,
    PER_HOP_S,
    PER_SERVER_S,
    wave_deadline_s,
)
from treewave.core.echo import InitiatorPhase
from treewave.core.errors import StaleMessage
from treewave.core.messages import FinnWork
from treewave.core.simulation import SimNetwork
from treewave.core.topology import Settings, Topology
from treewave.generator.generate import generate

DEFAULT_TIMEOUT_S = Settings().wave_timeout_s


def test_small_trees_keep_the_setting() -> None:
    # The default 10-server deployment (depth 3): the setting, unchanged.
    assert wave_deadline_s(5.0, 3, 10) == 5.0
    assert wave_deadline_s(0.5, 0, 1) == BASE_S + PER_SERVER_S


def test_large_trees_get_more_than_the_setting() -> None:
    assert wave_deadline_s(5.0, 12, 1000) == pytest.approx(BASE_S + 12 * PER_HOP_S + 10.0)
    assert wave_deadline_s(5.0, 999, 1000) == pytest.approx(BASE_S + 999 * PER_HOP_S + 10.0)
    assert wave_deadline_s(5.0, 20, 10**6) == MAX_WAVE_DEADLINE_S


@given(
    setting=st.floats(min_value=0.01, max_value=600),
    depth=st.integers(min_value=0, max_value=10_000),
    servers=st.integers(min_value=1, max_value=1_000_000),
    more_depth=st.integers(min_value=0, max_value=100),
    more_servers=st.integers(min_value=0, max_value=10_000),
)
def test_never_below_the_setting_and_monotone(
    setting: float, depth: int, servers: int, more_depth: int, more_servers: int
) -> None:
    d = wave_deadline_s(setting, depth, servers)
    assert d >= setting
    assert d <= max(setting, MAX_WAVE_DEADLINE_S)
    assert wave_deadline_s(setting, depth + more_depth, servers + more_servers) >= d


@pytest.mark.parametrize(
    ("setting", "depth", "servers"),
    [(0.0, 1, 2), (-1.0, 1, 2), (float("nan"), 1, 2), (5.0, -1, 2), (5.0, 1, 0)],
)
def test_bad_input_is_refused(setting: float, depth: int, servers: int) -> None:
    with pytest.raises(ValueError, match=r"wave_timeout_s|depth"):
        wave_deadline_s(setting, depth, servers)


def _next_deadline(net: SimNetwork) -> float:
    deadlines = [d for s in net.servers.values() if (d := s.protocol.next_deadline()) is not None]
    deadlines += [e.deadline for e in net.echo.values() if e.phase is InitiatorPhase.WAITING]
    deadlines += [f.deadline for f in net.finn.values() if f.result is None]
    return min(deadlines, default=float("inf"))


def _run_on_a_busy_machine(net: SimNetwork, wave: str, seconds_per_message: float) -> None:
    """Until the balancer decides: deliver messages one at a time on one shared CPU, each
    costing `seconds_per_message` of the clock; timers fire once the clock passes their
    deadline (looked up every 20 messages, far less than any per-hop step here)."""
    rng = random.Random(1)
    next_deadline = _next_deadline(net)
    delivered = 0
    while net.logs[wave].result is None:
        if not net.in_flight or net.now >= next_deadline:
            net.advance(max(net.now, next_deadline))
            next_deadline = _next_deadline(net) if net.logs[wave].result is None else 0.0
            continue
        with contextlib.suppress(StaleMessage):  # late, past a deadline: servers drop it
            net.deliver(rng.randrange(len(net.in_flight)))
        net.now += seconds_per_message
        delivered += 1
        if delivered % 20 == 0:
            next_deadline = _next_deadline(net)


@pytest.fixture(scope="module")
def large() -> Topology:
    return generate(1000, 3, extra_parents=100)


# 4 ms per message: twenty times the CPU a wave message costs on the 2-core development
# machine, and Echo sends about 2.2 messages per server here, so a server costs 8.8 ms:
# within PER_SERVER_S. The fixed 5 s setting is too short for this tree at that speed.
SLOW = 0.004


@pytest.mark.parametrize("algorithm", ["echo", "finn"])
def test_a_large_tree_on_a_slow_machine_completes_under_the_grown_deadline(
    large: Topology, algorithm: str
) -> None:
    grown = wave_deadline_s(DEFAULT_TIMEOUT_S, large.depth, len(large.servers))
    outcomes = {}
    for name, budget in (("fixed", DEFAULT_TIMEOUT_S), ("grown", grown)):
        net = SimNetwork(large)
        if algorithm == "echo":
            # As the balancer does: a quarter of the budget spread over depth + 2 hops.
            net.start_echo("w", budget, budget / (4 * (large.depth + 2)))
        else:
            net.start_finn("w", FinnWork(tasks_per_node=0), budget)
        _run_on_a_busy_machine(net, "w", SLOW)
        result = net.logs["w"].result
        assert result is not None
        outcomes[name] = result.complete
    assert grown > DEFAULT_TIMEOUT_S
    assert outcomes == {"fixed": False, "grown": True}
