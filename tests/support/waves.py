"""What the wave tests share (tests/unit/test_waves_*.py, test_echo.py, test_finn.py,
test_node_protocol.py): digests of every machine's state (to prove a refused message
changed nothing), injecting a message, spanning-tree checks, a clock-driven run, and the
small topology the plain tests use."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from treewave.core.echo import EchoInitiator, InitiatorPhase
from treewave.core.errors import RemoteProtocolError
from treewave.core.events import EchoResult
from treewave.core.finn import FinnInitiator, FinnNodeWave
from treewave.core.messages import EchoExplore, EchoReply, FinnSets
from treewave.core.node import NodeProtocol
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER, ServerSpec, Topology

WaveMsg = EchoExplore | EchoReply | FinnSets
BUDGET = 100.0


@dataclass(frozen=True)
class Load:
    """A simulated server's counters at one moment."""

    cpus: int
    running: int
    queued: int
    completed: int


def load_now(net: SimNetwork, name: str) -> Load:
    s = net.servers[name]
    return Load(s.cpus, s.running, s.queued, s.completed)


def node_digest(p: NodeProtocol) -> Any:
    """Everything a server's protocol engine remembers, for "state unchanged" checks."""
    echo = {
        w: (e.parent, frozenset(e.pending), tuple(e.states), e.sent, e.phase, e.deadline)
        for w, e in p.echo_waves.items()
    }
    finn = {w: finn_digest(f) for w, f in p.finn_waves.items()}
    return echo, finn, tuple(p.finished)


def finn_digest(f: FinnNodeWave) -> Any:
    k = f.sets
    return (
        frozenset(k.inc),
        frozenset(k.ninc),
        tuple(sorted(k.dec.items())),
        frozenset(k.unheard),
        frozenset(k.undecided_in),
        k.phase,
        f.sent,
        f.deadline,
    )


def initiator_digest(init: EchoInitiator | FinnInitiator) -> Any:
    if isinstance(init, EchoInitiator):
        return init.phase, init.deadline, init.result
    k = init.sets
    return (
        frozenset(k.inc),
        frozenset(k.ninc),
        tuple(sorted(k.dec.items())),
        frozenset(k.unheard),
        frozenset(k.undecided_in),
        k.phase,
        init.result,
    )


def network_digest(net: SimNetwork) -> Any:
    return (
        {
            n: (node_digest(s.protocol), load_now(net, n), tuple(s.decisions))
            for n, s in net.servers.items()
        },
        {w: initiator_digest(i) for w, i in net.echo.items()},
        {w: initiator_digest(i) for w, i in net.finn.items()},
        list(net.in_flight),
        {
            w: (log.messages, frozenset(log.participants), tuple(log.decide_order))
            for w, log in net.logs.items()
        },
    )


def inject(net: SimNetwork, to: str, msg: WaveMsg) -> object:
    """Hand `msg` straight to `to`'s state machine (bypassing the in-flight pool)."""
    if to == BALANCER:
        if isinstance(msg, FinnSets):
            return net.finn[msg.wave].receive(msg)
        return net.echo[msg.wave].receive(msg)
    server = net.servers[to]
    return server.protocol.receive(msg, net.now, server.state())


def assert_rejected_unchanged(
    net: SimNetwork, to: str, msg: WaveMsg, reason: str | None = None
) -> RemoteProtocolError:
    """`msg` is refused with a RemoteProtocolError and changes nothing at all."""
    before = network_digest(net)
    with pytest.raises(RemoteProtocolError) as info:
        inject(net, to, msg)
    assert network_digest(net) == before
    if reason is not None:
        assert info.value.reason == reason, info.value
    assert str(info.value)
    return info.value


def is_tree(topo: Topology) -> bool:
    return all(len(topo.parents(n)) <= 1 for n in topo.names)


def check_spanning_tree(topo: Topology, parent_of: dict[str, str]) -> None:
    """`parent_of` (server -> its Echo parent) is a spanning tree rooted at the balancer."""
    assert set(parent_of) == set(topo.names)
    assert [n for n, p in parent_of.items() if p == BALANCER] == [topo.root]
    for name, parent in parent_of.items():
        assert parent in topo.echo_neighbours(name)
    for name in topo.names:
        seen = {name}
        at = name
        while at != BALANCER:
            at = parent_of[at]
            assert at not in seen, f"echo parents form a cycle through {at!r}"
            seen.add(at)


def run_with_clock(net: SimNetwork, rng: random.Random, drop: set[str]) -> int:
    """Deliver everything, then move the clock to the next deadline, until no wave waits.
    Returns how many times the clock moved (bounded: the test fails rather than hangs)."""
    for ticks in range(1000):
        net.run(rng, drop)
        deadlines = [
            d for s in net.servers.values() if (d := s.protocol.next_deadline()) is not None
        ]
        deadlines += [e.deadline for e in net.echo.values() if e.phase is InitiatorPhase.WAITING]
        deadlines += [f.deadline for f in net.finn.values() if f.result is None]
        if not deadlines:
            return ticks
        net.advance(max(net.now, min(deadlines)))
    raise AssertionError("the waves never finished")


def component_without(topo: Topology, dead: str) -> set[str]:
    """Servers the root still reaches over the undirected graph once `dead` is gone."""
    if dead == topo.root:
        return set()
    seen, todo = {topo.root}, [topo.root]
    while todo:
        at = todo.pop()
        for n in topo.echo_neighbours(at):
            if n not in seen and n not in (BALANCER, dead):
                seen.add(n)
                todo.append(n)
    return seen


def descendants_or_self(topo: Topology, name: str) -> set[str]:
    seen, todo = {name}, [name]
    while todo:
        for c in topo.children(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


SMALL = Topology.from_servers(
    [
        ServerSpec(name="root", cpus=2, tasks=1, children=("alpha", "beta")),
        ServerSpec(name="alpha", cpus=1, tasks=0, children=("gamma", "delta")),
        ServerSpec(name="beta", cpus=2, tasks=3, children=("delta", "omega")),
        ServerSpec(name="gamma", cpus=1, tasks=0),
        ServerSpec(name="delta", cpus=1, tasks=2, children=("eps",)),
        ServerSpec(name="eps", cpus=3, tasks=0),
        ServerSpec(name="omega", cpus=1, tasks=1),
    ]
)


def partial_topologies() -> list[Topology]:
    shapes = [(12, 1, TreeShape(3, 0)), (15, 2, TreeShape(2, 4)), (20, 3, TreeShape(4, 6))]
    return [SMALL] + [random_topology(n, seed, shape) for n, seed, shape in shapes]


def started_echo(topo: Topology = SMALL) -> SimNetwork:
    net = SimNetwork(topo)
    net.start_echo("echo-1", BUDGET)
    net.deliver(0)  # the root has the explore and has explored its children
    return net


def finish_exactly(net: SimNetwork, topo: Topology = SMALL) -> None:
    net.run(random.Random(7))
    result = net.logs["echo-1"].result
    assert isinstance(result, EchoResult)
    assert result.complete
    assert net.logs["echo-1"].messages == result.messages == 2 * topo.echo_edge_count
