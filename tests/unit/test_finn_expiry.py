"""Finn's wall-clock expiry, in the core: a server that has not decided when a message of
the wave reaches it past `expires_at` never decides (the wave is over there); one that
decided keeps absorbing late messages. The clock is passed in, like `now`.

Also the phase surface every initiator shares (`phase`, `receive`, `handle_timer`)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from treewave.core.echo import EchoInitiator, InitiatorPhase
from treewave.core.errors import StaleMessage
from treewave.core.events import FinnDecided
from treewave.core.finn import FinnInitiator, FinnInitiatorPhase, FinnPhase
from treewave.core.messages import FinnSets, FinnWork
from treewave.core.node import NodeProtocol
from treewave.core.topology import BALANCER, ServerSpec, Topology

# root -> a, b; a and b -> c (c has two parents, so it hears twice before deciding)
TOPO = Topology.from_servers(
    [
        ServerSpec(name="root", cpus=1, children=("a", "b")),
        ServerSpec(name="a", cpus=1, children=("c",)),
        ServerSpec(name="b", cpus=1, children=("c",)),
        ServerSpec(name="c", cpus=1),
    ]
)
WORK = FinnWork(tasks_per_node=1)


def sets(sender: str, inc: set[str], ninc: set[str], dec: dict[str, int], **kw: object) -> FinnSets:
    return FinnSets(
        wave="w",
        sender=sender,
        inc=frozenset(inc),
        ninc=frozenset(ninc),
        dec=dec,
        work=WORK,
        budget_s=10.0,
        **kw,
    )


def from_balancer(expires_at: float | None) -> FinnSets:
    return sets(BALANCER, {BALANCER}, {BALANCER}, {BALANCER: 1}, expires_at=expires_at)


def decided(out: Sequence[object]) -> bool:
    return any(isinstance(o, FinnDecided) for o in out)


def test_a_wave_arriving_past_its_expiry_is_stale_and_over() -> None:
    root = NodeProtocol("root", TOPO)
    local = root.local_state(1, 0, 0, 0)
    with pytest.raises(StaleMessage, match="expired"):
        root.receive(from_balancer(100.0), 0.0, local, wall_now=100.5)
    assert "w" in root.finished
    assert not root.finn_waves
    with pytest.raises(StaleMessage, match="already over"):
        root.receive(from_balancer(100.0), 0.0, local, wall_now=99.0)


def test_a_wave_in_time_decides() -> None:
    root = NodeProtocol("root", TOPO)
    out = root.receive(from_balancer(100.0), 0.0, root.local_state(1, 0, 0, 0), wall_now=99.0)
    assert decided(out)
    assert root.finn_waves["w"].phase is FinnPhase.DECIDED


def test_without_a_clock_or_an_expiry_nothing_expires() -> None:
    root = NodeProtocol("root", TOPO)
    local = root.local_state(1, 0, 0, 0)
    assert decided(root.receive(from_balancer(100.0), 0.0, local))
    other = NodeProtocol("root", TOPO)
    assert decided(other.receive(from_balancer(None), 0.0, local, wall_now=1e12))


def _from_parent(parent: str, expires_at: float) -> FinnSets:
    everyone_before = {BALANCER, "root", parent}
    return sets(
        parent,
        everyone_before,
        everyone_before,
        {BALANCER: 1, "root": 2, parent: 1},
        expires_at=expires_at,
    )


def test_a_server_waiting_for_its_second_parent_expires_and_never_decides() -> None:
    c = NodeProtocol("c", TOPO)
    local = c.local_state(1, 0, 0, 0)
    out = c.receive(_from_parent("a", 100.0), 0.0, local, wall_now=99.0)
    assert not decided(out)
    assert c.finn_waves["w"].phase is FinnPhase.LISTENING
    with pytest.raises(StaleMessage, match="expired"):
        c.receive(_from_parent("b", 100.0), 0.0, local, wall_now=100.5)
    assert "w" not in c.finn_waves  # the wave is over here: it never decides
    with pytest.raises(StaleMessage):
        c.receive(_from_parent("b", 100.0), 0.0, local, wall_now=99.0)


def test_a_server_that_decided_absorbs_late_messages_after_the_expiry() -> None:
    root = NodeProtocol("root", TOPO)
    local = root.local_state(1, 0, 0, 0)
    root.receive(from_balancer(100.0), 0.0, local, wall_now=99.0)
    assert root.finn_waves["w"].phase is FinnPhase.DECIDED
    root.receive(from_balancer(100.0), 0.0, local, wall_now=200.0)  # no error
    assert root.finn_waves["w"].phase is FinnPhase.DECIDED


def test_initiators_share_one_surface_with_a_phase_enum_each() -> None:
    echo = EchoInitiator("e", "root", frozenset(TOPO.names))
    finn = FinnInitiator("f", "root", TOPO.leaves, frozenset(TOPO.names), WORK)
    # Compared as a pair: `assert echo.phase is ...` would narrow `echo.phase` for mypy,
    # which cannot see `start` or `handle_timer` change it.
    assert (echo.phase, finn.phase) == (InitiatorPhase.IDLE, FinnInitiatorPhase.IDLE)
    echo.start(0.0, 10.0)
    finn.start(0.0, 10.0)
    assert (echo.phase, finn.phase) == (InitiatorPhase.WAITING, FinnInitiatorPhase.WAITING)
    assert echo.handle_timer(5.0) is None
    assert finn.handle_timer(5.0) is None
    echo_result = echo.handle_timer(10.0)
    finn_result = finn.handle_timer(10.0)
    assert echo_result is not None
    assert not echo_result.complete
    assert finn_result is not None
    assert not finn_result.complete
    assert (echo.phase, finn.phase) == (InitiatorPhase.DECIDED, FinnInitiatorPhase.DECIDED)
