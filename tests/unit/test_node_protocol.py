"""A server's `NodeProtocol`, which routes every wave message to its Echo or Finn machine by
wave id: finished ids stay stale, and an id never crosses from one algorithm to the other."""

from __future__ import annotations

from tests.support.waves import (
    BUDGET,
    SMALL,
    assert_rejected_unchanged,
    finish_exactly,
    started_echo,
)
from treewave.core.errors import StaleMessage
from treewave.core.messages import EchoExplore, EchoReply, FinnSets, FinnWork
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER


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
