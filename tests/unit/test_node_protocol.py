"""A server's `NodeProtocol`, which routes every wave message to its Echo or Finn machine by
wave id: finished ids stay stale, and an id never crosses from one algorithm to the other."""

from __future__ import annotations

import pytest

from tests.support.waves import (
    BUDGET,
    SMALL,
    assert_rejected_unchanged,
    finish_exactly,
    started_echo,
)
from treewave.core.errors import StaleMessage
from treewave.core.events import Send
from treewave.core.messages import EchoExplore, EchoReply, FinnSets, FinnWork, ServerState
from treewave.core.node import FINISHED_MEMORY, NodeProtocol
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER, Topology


def test_finished_echo_wave_id_is_stale_everywhere() -> None:
    net = started_echo()
    finish_exactly(net)
    late = EchoExplore(wave="echo-1", sender=BALANCER, budget_s=BUDGET)
    for name in SMALL.names:
        sender = SMALL.echo_neighbours(name)[0]
        msg = late.model_copy(update={"sender": sender})
        err = assert_rejected_unchanged(net, name, msg, reason="stale_wave")
        assert isinstance(err, StaleMessage)
    root_reply = EchoReply(
        wave="echo-1", sender="root", states=(net.servers["root"].state(),), sent=1
    )
    assert isinstance(assert_rejected_unchanged(net, BALANCER, root_reply), StaleMessage)
    # The same id cannot be reused for a Finn wave at a server either.
    finn = FinnSets(
        wave="echo-1",
        sender=BALANCER,
        inc=frozenset({BALANCER}),
        ninc=frozenset({BALANCER}),
        dec={BALANCER: 1},
        work=FinnWork(),
        budget_s=BUDGET,
    )
    assert_rejected_unchanged(net, "root", finn, reason="stale_wave")


def test_wave_ids_do_not_cross_algorithms() -> None:
    net = started_echo()
    finn = FinnSets(
        wave="echo-1",
        sender=BALANCER,
        inc=frozenset({BALANCER}),
        ninc=frozenset({BALANCER}),
        dec={BALANCER: 1},
        work=FinnWork(),
        budget_s=BUDGET,
    )
    assert_rejected_unchanged(net, "root", finn, reason="wrong_algorithm")
    net2 = SimNetwork(SMALL)
    net2.start_finn("finn-1", FinnWork(), BUDGET)
    net2.deliver(0)
    explore = EchoExplore(wave="finn-1", sender=BALANCER, budget_s=BUDGET)
    assert_rejected_unchanged(net2, "root", explore, reason="wrong_algorithm")
    finish_exactly(net)


def _cpus(cpus: int = 1) -> ServerState:
    return ServerState(name="mid", cpus=cpus, running=0, queued=0, completed=0)


TWO_CHILDREN = Topology.parse(
    {
        "servers": [
            {"name": "mid", "cpus": 1, "children": ["left", "right"]},
            {"name": "left", "cpus": 1},
            {"name": "right", "cpus": 1},
        ]
    }
)


def test_an_explore_that_cannot_go_out_gives_its_neighbour_up() -> None:
    """No link to a child (it is not up yet, or gone): waiting for its answer would hold
    the wave, and every wave above, until the deadline. The child is given up instead: the
    server replies as soon as the others have answered, and counts the explore as unsent."""
    node = NodeProtocol("mid", TWO_CHILDREN)
    explore = EchoExplore(wave="w", sender=BALANCER, budget_s=3600.0)
    sends = node.receive(explore, 0.0, _cpus())
    assert sorted(s.to for s in sends if isinstance(s, Send)) == ["left", "right"]
    to_left = next(s for s in sends if isinstance(s, Send) and s.to == "left")
    assert isinstance(to_left.message, EchoExplore)
    assert node.send_failed("left", to_left.message, _cpus()) == []  # right still out
    # A late answer from the child given up is stale, not a protocol error.
    late = EchoExplore(wave="w", sender="left", budget_s=1.0)
    with pytest.raises(StaleMessage):
        node.receive(late, 0.1, _cpus())
    right = ServerState(name="right", cpus=1, running=0, queued=0, completed=0)
    (reply,) = node.receive(
        EchoReply(wave="w", sender="right", states=(right,), sent=1), 0.2, _cpus()
    )
    assert isinstance(reply, Send)
    assert isinstance(reply.message, EchoReply)
    assert reply.to == BALANCER
    assert [s.name for s in reply.message.states] == ["mid", "right"]
    # mid's explore to right, right's reply and mid's reply: the lost explore not counted.
    assert reply.message.sent == 3
    assert "w" not in node.echo_waves


def test_the_last_explore_failing_answers_the_parent_at_once() -> None:
    node = NodeProtocol("mid", TWO_CHILDREN)
    sends = node.receive(EchoExplore(wave="w", sender=BALANCER, budget_s=3600.0), 0.0, _cpus())
    out = []
    for s in sends:
        assert isinstance(s, Send)
        assert isinstance(s.message, EchoExplore)
        out += node.send_failed(s.to, s.message, _cpus())
    (reply,) = out
    assert isinstance(reply, Send)
    assert isinstance(reply.message, EchoReply)
    assert (reply.to, reply.message.sent, len(reply.message.states)) == (BALANCER, 1, 1)
    assert node.next_deadline() is None  # nothing left to time out
    # Failing again (or a reply, or Finn's sets, failing) changes nothing.
    assert node.send_failed("left", sends[0].message, _cpus()) == []  # type: ignore[union-attr]
    assert node.send_failed(BALANCER, reply.message, _cpus()) == []


def test_a_leaf_remembers_its_newest_finished_waves_within_a_bound() -> None:
    """A late explore of any of the last `FINISHED_MEMORY` waves is stale however many
    waves passed, and the memory stays bounded (at most twice that)."""
    topo = Topology.parse(
        {"servers": [{"name": "a", "cpus": 1, "children": ["b"]}, {"name": "b", "cpus": 1}]}
    )
    leaf = NodeProtocol("b", topo)
    state = ServerState(name="b", cpus=1, running=0, queued=0, completed=0, parents=("a",))
    waves = 3 * FINISHED_MEMORY + 7
    for i in range(waves):
        out = leaf.receive(EchoExplore(wave=f"w{i}", sender="a", budget_s=5), 0.0, state)
        assert [type(o.message) for o in out if isinstance(o, Send)] == [EchoReply]
        assert len(leaf.finished) <= 2 * FINISHED_MEMORY
    assert not leaf.echo_waves
    for i in range(waves - FINISHED_MEMORY, waves):
        with pytest.raises(StaleMessage):
            leaf.receive(EchoExplore(wave=f"w{i}", sender="a", budget_s=5), 0.0, state)
    assert "w0" not in leaf.finished  # the oldest were forgotten
