"""The Finn machines (a server's `FinnNodeWave`, the balancer's `FinnInitiator`) through the
in-memory network: dead servers and partial waves at the deadline, and each kind of bad
message refused without changing anything."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.support.waves import (
    BUDGET,
    SMALL,
    assert_rejected_unchanged,
    descendants_or_self,
    inject,
    network_digest,
    partial_topologies,
)
from treewave.core.echo import EchoInitiator
from treewave.core.errors import LocalProtocolError, StaleMessage
from treewave.core.events import EchoResult, FinnResult
from treewave.core.finn import FinnInitiator
from treewave.core.messages import FinnSets, FinnWork
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER, Topology

# --- dead servers, partial waves ---


@pytest.mark.parametrize("topo", partial_topologies(), ids=lambda t: f"{len(t)}servers")
def test_finn_with_a_dead_server_decides_partial_at_the_deadline(topo: Topology) -> None:
    work = FinnWork(tasks_per_node=2)
    for dead in topo.names:
        net = SimNetwork(topo)
        net.start_finn("finn-1", work, BUDGET)
        net.run(random.Random(dead), {dead})
        log = net.logs["finn-1"]
        assert log.result is None, "the balancer cannot decide while a server is dead"
        net.advance(BUDGET)
        result = log.result
        assert isinstance(result, FinnResult)
        assert not result.complete
        blocked = descendants_or_self(topo, dead)
        truly = {n for n, s in net.servers.items() if "finn-1" in s.decisions}
        assert truly == set(topo.names) - blocked
        # The balancer hears of a decision through some leaf it can still reach.
        alive_to_leaf = {
            n
            for n in truly
            if any(
                leaf not in blocked and leaf in descendants_or_self(topo, n) for leaf in topo.leaves
            )
            or _path_to_balancer_avoiding(topo, n, dead)
        }
        assert set(result.decided) == alive_to_leaf
        assert set(result.decided) <= truly
        for name, server in net.servers.items():
            assert server.decisions.count("finn-1") == (1 if name in truly else 0)
            assert server.queued == topo.server(name).tasks + (2 if name in truly else 0)
        assert log.sent_after_decision == 0
        # Late messages for the wave are refused as stale, not re-counted.
        net.advance(BUDGET * 2)
        for name in truly:
            assert "finn-1" in net.servers[name].protocol.finished


def _path_to_balancer_avoiding(topo: Topology, start: str, dead: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        at = todo.pop()
        if not topo.children(at):
            return True
        for c in topo.children(at):
            if c != dead and c not in seen:
                seen.add(c)
                todo.append(c)
    return False


def test_finn_never_decides_early_and_completes_without_deaths() -> None:
    topo = random_topology(25, 11, TreeShape(3, 8))
    for seed in range(20):
        net = SimNetwork(topo)
        net.start_finn("finn-1", FinnWork(tasks_per_node=1), BUDGET)
        net.start_echo("echo-2", BUDGET)
        net.run(random.Random(seed))
        finn, echo = net.logs["finn-1"], net.logs["echo-2"]
        assert isinstance(finn.result, FinnResult)
        assert finn.result.complete
        assert finn.result.messages == finn.messages
        assert finn.decide_order[-1] == BALANCER
        assert isinstance(echo.result, EchoResult)
        assert echo.result.complete
        assert echo.messages == echo.result.messages == 2 * topo.echo_edge_count


# --- bad messages are refused and change nothing ---


def finn_msg(sender: str, **update: Any) -> FinnSets:
    base = FinnSets(
        wave="finn-1",
        sender=sender,
        inc=frozenset({BALANCER, "root", sender}),
        ninc=frozenset({BALANCER, "root", sender}),
        dec={BALANCER: 1, "root": 2, sender: 2},
        work=FinnWork(tasks_per_node=1),
        budget_s=BUDGET,
    )
    return base.model_copy(update=update)


def started_finn() -> SimNetwork:
    net = SimNetwork(SMALL)
    net.start_finn("finn-1", FinnWork(tasks_per_node=1), BUDGET)
    net.deliver(0)  # the root decided and told its children
    return net


def finish_finn_exactly(net: SimNetwork) -> None:
    net.run(random.Random(5))
    log = net.logs["finn-1"]
    assert isinstance(log.result, FinnResult)
    assert log.result.complete
    assert log.result.messages == log.messages
    assert log.sent_after_decision == 0
    for name, server in net.servers.items():
        assert server.decisions == ["finn-1"]
        assert server.queued == SMALL.server(name).tasks + 1


def test_finn_message_from_a_non_in_neighbour_is_refused() -> None:
    net = started_finn()
    # gamma is alpha's child, not its parent; omega is not a neighbour at all.
    assert_rejected_unchanged(net, "alpha", finn_msg("gamma"), reason="not_neighbour")
    assert_rejected_unchanged(net, "eps", finn_msg("omega"), reason="not_neighbour")
    assert "finn-1" not in net.servers["eps"].protocol.finn_waves
    # The balancer hears only from leaves.
    assert_rejected_unchanged(net, BALANCER, finn_msg("alpha"), reason="not_neighbour")
    finish_finn_exactly(net)


def test_finn_different_work_is_refused() -> None:
    net = started_finn()
    # alpha has the wave (from the root); then a message claiming other work.
    i = next(k for k, (_f, t, _m) in enumerate(net.in_flight) if t == "alpha")
    net.deliver(i)
    other = finn_msg("root", work=FinnWork(tasks_per_node=5))
    assert_rejected_unchanged(net, "alpha", other, reason="invalid_fields")
    finish_finn_exactly(net)


@pytest.mark.parametrize(
    "update",
    [
        {"ninc": frozenset({BALANCER, "ghost"})},
        {"inc": frozenset(), "ninc": frozenset(), "dec": {}},
        {"ninc": frozenset(), "dec": {BALANCER: 1}},
        {"dec": {BALANCER: 0}},
    ],
    ids=["ninc-not-in-inc", "sender-not-in-inc", "dec-not-in-ninc", "dec-count-zero"],
)
def test_finn_inconsistent_sets_are_refused(update: dict[str, Any]) -> None:
    # Such a message could make the size test `len(inc) == len(ninc)` pass early.
    net = SimNetwork(SMALL)
    net.start_finn("finn-1", FinnWork(tasks_per_node=1), BUDGET)
    first = net.in_flight[0][2]
    assert isinstance(first, FinnSets)
    assert_rejected_unchanged(net, "root", first.model_copy(update=update), "invalid_fields")
    assert "finn-1" not in net.servers["root"].protocol.finn_waves
    finish_finn_exactly(net)


def test_finn_early_decision_attack_is_refused() -> None:
    # delta has two parents (alpha, beta). A forged message from alpha claiming beta has
    # decided and padding ninc with a ghost would let delta decide without hearing from
    # beta; the consistency check refuses it.
    net = started_finn()
    forged = finn_msg(
        "alpha",
        inc=frozenset({BALANCER, "root", "alpha", "beta"}),
        ninc=frozenset({BALANCER, "root", "alpha", "beta", "ghost"}),
        dec={BALANCER: 1, "root": 2, "alpha": 2, "beta": 2},
    )
    assert_rejected_unchanged(net, "delta", forged, reason="invalid_fields")
    assert net.servers["delta"].decisions == []
    finish_finn_exactly(net)


def test_finn_late_message_after_the_deadline_is_stale() -> None:
    net = started_finn()
    finish_finn_exactly(net)
    net.advance(BUDGET)
    for name in SMALL.names:
        assert "finn-1" in net.servers[name].protocol.finished
    assert_rejected_unchanged(net, "alpha", finn_msg("root"), reason="stale_wave")


def test_finn_balancer_absorbs_an_overtaken_message_and_refuses_news_after_deciding() -> None:
    # eps has one parent, but delta (its parent) has two: delta sends to eps when it first
    # hears from alpha and again when it decides, and eps forwards both to the balancer.
    # Delivered out of order, the earlier one reaches the balancer after its decision.
    net = SimNetwork(SMALL)
    net.start_finn("finn-1", FinnWork(tasks_per_node=1), BUDGET)
    held: list[FinnSets] = []
    rng = random.Random(2)
    while net.in_flight:
        i = rng.randrange(len(net.in_flight))
        _f, to, msg = net.in_flight[i]
        if (
            to == BALANCER
            and not held
            and isinstance(msg, FinnSets)
            and msg.sender == "eps"
            and "eps" not in msg.dec
        ):
            held.append(msg)  # keep the pre-decision message back
            net.in_flight.pop(i)
            continue
        net.deliver(i)
    log = net.logs["finn-1"]
    assert isinstance(log.result, FinnResult)
    assert log.result.complete
    [old] = held
    assert isinstance(old, FinnSets)
    before = network_digest(net)
    assert inject(net, BALANCER, old) is None
    assert network_digest(net) == before
    # News after a decision (here, a forged newcomer) is stale.
    news = old.model_copy(
        update={
            "inc": old.inc | {"ghost"},
            "ninc": old.ninc | {"ghost"},
        }
    )
    assert isinstance(assert_rejected_unchanged(net, BALANCER, news), StaleMessage)


def test_finn_late_leaf_message_after_a_partial_decision_is_stale() -> None:
    net = SimNetwork(SMALL)
    net.start_finn("finn-1", FinnWork(tasks_per_node=1), BUDGET)
    net.run(random.Random(4), {"eps"})
    net.advance(BUDGET)
    result = net.logs["finn-1"].result
    assert isinstance(result, FinnResult)
    assert not result.complete
    late = finn_msg("eps", inc=frozenset(SMALL.names) | {BALANCER},
                    ninc=frozenset(SMALL.names) | {BALANCER},
                    dec=dict.fromkeys([*SMALL.names, BALANCER], 1))  # fmt: skip
    assert isinstance(assert_rejected_unchanged(net, BALANCER, late), StaleMessage)


def test_starting_a_wave_twice_is_a_local_error() -> None:
    init = EchoInitiator("echo-1", "root", frozenset(SMALL.names))
    init.start(0.0, BUDGET)
    with pytest.raises(LocalProtocolError):
        init.start(0.0, BUDGET)
    finn = FinnInitiator("finn-1", "root", SMALL.leaves, frozenset(SMALL.names), FinnWork())
    with pytest.raises(LocalProtocolError):
        finn.receive(finn_msg("omega"))
    finn.start(0.0, BUDGET)
    with pytest.raises(LocalProtocolError):
        finn.start(0.0, BUDGET)
