"""The Echo machines (a server's `EchoNodeWave`, the balancer's `EchoInitiator`) through the
in-memory network: dead servers and partial waves, nested deadlines, and each kind of bad
message refused without changing anything."""

from __future__ import annotations

import random

import pytest

from tests.support.waves import (
    BUDGET,
    SMALL,
    assert_rejected_unchanged,
    component_without,
    finish_exactly,
    partial_topologies,
    run_with_clock,
    started_echo,
)
from treewave.core.echo import EchoPhase
from treewave.core.events import EchoResult
from treewave.core.messages import EchoExplore, EchoReply
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER, ServerSpec, Topology

# --- dead servers, partial waves ---


@pytest.mark.parametrize("topo", partial_topologies(), ids=lambda t: f"{len(t)}servers")
def test_echo_with_a_dead_server_decides_partial(topo: Topology) -> None:
    for dead in topo.names:
        net = SimNetwork(topo)
        net.start_echo("echo-1", BUDGET)
        run_with_clock(net, random.Random(dead), {dead})
        log = net.logs["echo-1"]
        result = log.result
        assert isinstance(result, EchoResult), f"no decision with {dead} dead"
        assert not result.complete
        got = {s.name for s in result.states}
        missing = set(topo.names) - got
        assert dead in missing
        # Exactly the servers cut off from the root are missing; everyone else answered,
        # including when the root itself had to give up on a dead child.
        assert got == component_without(topo, dead)
        assert result.messages == log.messages < 2 * topo.echo_edge_count
        assert log.sent_after_decision == 0
        assert log.decide_order == [BALANCER]
        assert net.now < 2 * BUDGET


def test_echo_partial_when_a_child_of_the_root_dies_keeps_the_rest() -> None:
    net = SimNetwork(SMALL)
    net.start_echo("echo-1", BUDGET)
    run_with_clock(net, random.Random(1), {"alpha"})
    result = net.logs["echo-1"].result
    assert isinstance(result, EchoResult)
    assert not result.complete
    # gamma hangs only below alpha; delta is also below beta, so it and eps still answer.
    assert {s.name for s in result.states} == set(SMALL.names) - {"alpha", "gamma"}
    # The root answered at its own (shorter) deadline, before the balancer's.
    assert net.now < BUDGET


def test_echo_with_the_root_dead_decides_empty_at_the_deadline() -> None:
    net = SimNetwork(SMALL)
    net.start_echo("echo-1", BUDGET)
    net.run(random.Random(0), {"root"})
    assert net.logs["echo-1"].result is None
    net.advance(BUDGET - 0.001)
    assert net.logs["echo-1"].result is None
    net.advance(BUDGET)
    result = net.logs["echo-1"].result
    assert result == EchoResult("echo-1", False, (), 1)


# --- bad messages are refused and change nothing ---


def test_echo_parent_sending_again_is_refused() -> None:
    net = started_echo()
    again = EchoExplore(wave="echo-1", sender=BALANCER, budget_s=BUDGET)
    err = assert_rejected_unchanged(net, "root", again, reason="unexpected_sender")
    assert "parent sent again" in str(err)
    finish_exactly(net)


def test_echo_explore_from_a_non_neighbour_is_refused() -> None:
    net = started_echo()
    stranger = EchoExplore(wave="echo-1", sender="omega", budget_s=BUDGET)
    assert_rejected_unchanged(net, "root", stranger, reason="unexpected_sender")
    # A first explore from a non-neighbour does not even create the wave.
    assert_rejected_unchanged(net, "gamma", stranger, reason="not_neighbour")
    assert "echo-1" not in net.servers["gamma"].protocol.echo_waves
    finish_exactly(net)


def test_echo_duplicate_reply_is_refused() -> None:
    net = started_echo()
    rng = random.Random(3)
    # Deliver until alpha has replied to the root, then replay that reply.
    while True:
        i = next(
            (k for k, (f, t, m) in enumerate(net.in_flight) if f == "alpha" and t == "root"), None
        )
        if i is not None:
            _f, _t, reply = net.in_flight[i]
            net.deliver(i)
            break
        net.deliver(rng.randrange(len(net.in_flight)))
    assert isinstance(reply, EchoReply)
    assert_rejected_unchanged(net, "root", reply, reason="unexpected_sender")
    finish_exactly(net)


def test_echo_reply_not_starting_with_its_sender_is_refused() -> None:
    net = started_echo()
    wrong = EchoReply(wave="echo-1", sender="alpha", states=(net.servers["beta"].state(),), sent=1)
    assert_rejected_unchanged(net, "root", wrong, reason="invalid_fields")
    empty = EchoReply(wave="echo-1", sender="alpha", states=(), sent=1)
    assert_rejected_unchanged(net, "root", empty, reason="invalid_fields")
    finish_exactly(net)


def test_echo_reply_for_an_unknown_wave_is_refused() -> None:
    net = started_echo()
    reply = EchoReply(wave="nope", sender="alpha", states=(net.servers["alpha"].state(),), sent=1)
    assert_rejected_unchanged(net, "root", reply, reason="unknown_wave")
    finish_exactly(net)


def test_initiator_refuses_bad_replies() -> None:
    net = started_echo()
    alpha = net.servers["alpha"].state()
    not_root = EchoReply(wave="echo-1", sender="alpha", states=(alpha,), sent=1)
    assert_rejected_unchanged(net, BALANCER, not_root, reason="unexpected_sender")
    root = net.servers["root"].state()
    dup = EchoReply(wave="echo-1", sender="root", states=(root, alpha, alpha), sent=3)
    assert_rejected_unchanged(net, BALANCER, dup, reason="invalid_fields")
    ghost = root.model_copy(update={"name": "ghost"})
    unknown = EchoReply(wave="echo-1", sender="root", states=(root, ghost), sent=3)
    assert_rejected_unchanged(net, BALANCER, unknown, reason="invalid_fields")
    explore = EchoExplore(wave="echo-1", sender="root", budget_s=1)
    assert_rejected_unchanged(net, BALANCER, explore, reason="unexpected_sender")
    finish_exactly(net)


# --- deadlines ---


def test_echo_deadlines_nest_down_the_tree() -> None:
    net = SimNetwork(SMALL)
    net.start_echo("echo-1", BUDGET)
    explore = net.in_flight[0][2]
    assert isinstance(explore, EchoExplore)
    assert explore.budget_s < BUDGET  # the root must answer before the balancer gives up
    net.run(random.Random(0), {"eps"})
    deadlines = {
        n: w.deadline
        for n, s in net.servers.items()
        for w in s.protocol.echo_waves.values()
        if w.phase is EchoPhase.EXPLORING
    }
    # delta waits on eps; its ancestors on the echo tree wait on delta and have later deadlines.
    assert "delta" in deadlines
    assert deadlines["delta"] < deadlines["root"] < net.echo["echo-1"].deadline


def test_deep_chain_keeps_its_budget() -> None:
    """Deadlines step down linearly per hop: on a 100-server chain whose messages take
    10 ms each, the wave (5 s budget, the balancer's step for this depth) stays complete;
    a geometric shrink would have left the far end a few milliseconds and made it partial."""
    names = [f"c{i:03d}" for i in range(100)]
    chain = Topology.from_servers(
        ServerSpec(name=n, cpus=1, children=(names[i + 1],) if i + 1 < len(names) else ())
        for i, n in enumerate(names)
    )
    net = SimNetwork(chain)
    budget = 5.0
    net.start_echo("deep", budget_s=budget, hop_s=budget / (4 * (chain.depth + 2)))
    while net.in_flight:
        net.advance(net.now + 0.010)
        net.deliver(0)
    result = net.logs["deep"].result
    assert result is not None
    assert result.complete
    assert net.now < budget
    assert result.messages == 2 * chain.echo_edge_count
