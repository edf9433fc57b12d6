"""Echo and Finn through the in-memory network, under any delivery order.

The stateful test (`TestWaves`) draws a random rooted DAG, starts several Echo and Finn
waves at arbitrary moments, delivers *any* in-flight message at each step (hypothesis picks
the index), injects duplicates and foreign messages that must be rejected without changing
anything, and checks the algorithms' guarantees after every delivery. The plain tests
below it cover what the stateful test cannot reach without a clock: dead servers,
deadlines and partial waves, and each kind of bad message.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from treewave.core.echo import EchoInitiator, EchoPhase, InitiatorPhase
from treewave.core.errors import LocalProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.events import EchoResult, FinnResult
from treewave.core.finn import FinnInitiator, FinnNodeWave
from treewave.core.messages import EchoExplore, EchoReply, FinnSets, FinnWork, ServerState
from treewave.core.node import NodeProtocol
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER, ServerSpec, Topology

WaveMsg = EchoExplore | EchoReply | FinnSets
BUDGET = 100.0

# --- helpers shared by the stateful and the plain tests ------------------------------------


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


# --- the stateful test --------------------------------------------------------------------


class WaveMachine(RuleBasedStateMachine):
    """Several Echo and Finn waves in flight at once, delivered in any order.

    How the decided Echo snapshot is compared exactly: Finn decisions change a server's
    `queued` while Echo waves run, so "the true state" is taken at the moment each server
    sends its Echo reply (that reply carries its own state). The machine records, for each
    Echo wave, each server's counters right after the delivery that made it reply (an Echo
    delivery never changes counters, so these are exactly the counters the server
    reported) and the sender of the first explore it received (its Echo parent). The
    decided snapshot must equal, field for field, a `ServerState` built from the topology
    (name, cpus, parents, children) and those recordings (running, queued, completed,
    echo_parent). Nothing is compared "approximately" and Finn waves are not paused.
    """

    MAX_WAVES = 6

    @initialize(
        nodes=st.integers(1, 25),
        seed=st.integers(0, 2**32 - 1),
        max_children=st.integers(1, 4),
        extra_parents=st.integers(0, 8),
        first=st.lists(st.sampled_from([None, 0, 1, 2]), min_size=1, max_size=3),
    )
    def build(
        self, nodes: int, seed: int, max_children: int, extra_parents: int, first: list[int | None]
    ) -> None:
        """A random topology with 1-3 waves already started (None: Echo, k: Finn with k
        tasks per server), so every example has concurrent waves to deliver; more start
        at random moments through the rules."""
        self.topo = random_topology(nodes, seed, TreeShape(max_children, extra_parents))
        self.net = SimNetwork(self.topo)
        self.rng = random.Random(seed)
        self.names = frozenset(self.topo.names)
        self.initial_queued = {s.name: s.tasks for s in self.topo.servers}
        self.waves: list[str] = []
        self.work: dict[str, FinnWork] = {}
        self.replied_with: dict[str, dict[str, Load]] = {}
        self.echo_parent: dict[str, dict[str, str]] = {}
        self.delivered: list[tuple[str, str, WaveMsg]] = []
        self.decided: set[str] = set()
        self.bogus = 0
        for kind in first:
            if kind is None:
                self.start_echo()
            else:
                self.start_finn(kind)

    # rules ---------------------------------------------------------------------------------

    # Rules have no preconditions where a no-op will do: hypothesis gives up on a step
    # when its random pick of a rule hits disabled ones too often.

    @rule()
    def start_echo(self) -> None:
        if len(self.waves) >= self.MAX_WAVES:
            return
        wave = f"echo-{len(self.waves)}"
        self.waves.append(wave)
        self.replied_with[wave] = {}
        self.echo_parent[wave] = {}
        self.net.start_echo(wave, BUDGET)

    @rule(tasks=st.integers(0, 3))
    def start_finn(self, tasks: int) -> None:
        if len(self.waves) >= self.MAX_WAVES:
            return
        wave = f"finn-{len(self.waves)}"
        self.waves.append(wave)
        self.work[wave] = FinnWork(tasks_per_node=tasks)
        self.net.start_finn(wave, self.work[wave], BUDGET)

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        if not self.net.in_flight:
            return
        index = data.draw(st.integers(0, len(self.net.in_flight) - 1), label="index")
        self.deliver_checked(index)

    @rule(count=st.sampled_from([2, 5, 20, 60, 200]), seed=st.integers(0, 2**32 - 1))
    def deliver_a_few(self, count: int, seed: int) -> None:
        """Many deliveries per step, in an order drawn from `seed`, so that most of them
        (not just the teardown's) happen while other rules interleave; `deliver` above is
        the fine-grained version that shrinks well."""
        rng = random.Random(seed)
        for _ in range(count):
            if not self.net.in_flight:
                break
            self.deliver_checked(rng.randrange(len(self.net.in_flight)))

    @rule(data=st.data())
    def bad_message(self, data: st.DataObject) -> None:
        """A duplicate or a foreign message; one rule, so bad input does not crowd out
        deliveries."""
        if bool(self.delivered) and data.draw(st.booleans(), label="duplicate"):
            self.duplicate(data)
        else:
            self.foreign(data)

    def duplicate(self, data: st.DataObject) -> None:
        """A message delivered a second time: Echo and finished waves refuse it; Finn's
        sets are idempotent, so it is absorbed. Either way nothing changes."""
        i = data.draw(st.integers(0, len(self.delivered) - 1), label="which")
        _sender, to, msg = self.delivered[i]
        before = network_digest(self.net)
        try:
            out = inject(self.net, to, msg)
        except RemoteProtocolError:
            pass
        else:
            assert isinstance(msg, FinnSets), f"a duplicate {msg.type} was accepted"
            assert out in ([], None)
        assert network_digest(self.net) == before

    def foreign(self, data: st.DataObject) -> None:
        """A message from a server that is not a neighbour (or for a wave nobody knows)."""
        to = data.draw(st.sampled_from(sorted(self.names)), label="to")
        strangers = sorted((self.names | {BALANCER}) - set(self.topo.echo_neighbours(to)) - {to})
        if bool(self.waves) and data.draw(st.booleans(), label="known wave"):
            wave = data.draw(st.sampled_from(self.waves), label="wave")
        else:
            self.bogus += 1
            wave = f"bogus-{self.bogus}"
        if strangers:
            stranger = data.draw(st.sampled_from(strangers), label="from")
            if wave.startswith("finn"):
                msg: WaveMsg = FinnSets(
                    wave=wave,
                    sender=stranger,
                    inc=frozenset({stranger}),
                    ninc=frozenset({stranger}),
                    dec={stranger: 1},
                    work=self.work[wave],
                    budget_s=BUDGET,
                )
            else:
                msg = EchoExplore(wave=wave, sender=stranger, budget_s=BUDGET)
            assert_rejected_unchanged(self.net, to, msg)
        neighbour = data.draw(st.sampled_from(self.topo.echo_neighbours(to)), label="sender")
        if neighbour != BALANCER and not wave.startswith("finn"):
            state = self.net.servers[neighbour].state()
            reply = EchoReply(
                wave=f"bogus-r{self.bogus}", sender=neighbour, states=(state,), sent=1
            )
            self.bogus += 1
            assert_rejected_unchanged(self.net, to, reply, reason="unknown_wave")

    # checking each delivery ----------------------------------------------------------------

    def deliver_checked(self, index: int) -> None:
        net = self.net
        sender, to, msg = net.in_flight[index]
        wave = msg.wave
        log = net.logs[wave]
        size_before = len(net.in_flight)
        was_decided = {w for w in self.waves if net.logs[w].result is not None}
        decided_here_before = set(net.servers[to].decisions) if to != BALANCER else set()
        if isinstance(msg, EchoExplore) and to != BALANCER:
            self.echo_parent[wave].setdefault(to, sender)

        net.deliver(index)
        self.delivered.append((sender, to, msg))

        new = net.in_flight[size_before - 1 :]
        for _from, _to, out in new:
            assert out.wave not in was_decided, f"sent in {out.wave} after the balancer decided"
            if isinstance(out, FinnSets):
                assert out.wave not in decided_here_before, f"{to} sent after deciding {out.wave}"
            if isinstance(out, EchoReply):
                assert out.sender == to
                assert to not in self.replied_with[out.wave], f"{to} replied twice"
                self.replied_with[out.wave][to] = load_now(net, to)
        if to != BALANCER:
            server = net.servers[to]
            for w in set(server.decisions) - decided_here_before:
                assert w == wave
                self.check_finn_decision(to, w)
        elif log.result is not None and wave not in was_decided:
            if log.algorithm == "echo":
                self.check_echo_decided(wave)
            else:
                self.check_finn_decided(wave)

    def check_finn_decision(self, name: str, wave: str) -> None:
        """A server decides once, after every in-neighbour (root-down order)."""
        assert self.net.servers[name].decisions.count(wave) == 1
        for p in self.topo.finn_in(name):
            if p != BALANCER:
                assert wave in self.net.servers[p].decisions, f"{name} decided before {p}"

    def check_echo_decided(self, wave: str) -> None:
        net, log = self.net, self.net.logs[wave]
        result = log.result
        assert isinstance(result, EchoResult)
        self.decided.add(wave)
        assert log.participants == self.names
        assert result.complete
        assert result.messages == 2 * self.topo.echo_edge_count == log.messages
        assert not any(m.wave == wave for _f, _t, m in net.in_flight)
        assert result.states[0].name == self.topo.root
        names = [s.name for s in result.states]
        assert len(names) == len(set(names)) == len(self.names)
        expected = {
            name: ServerState(
                name=name,
                cpus=self.topo.server(name).cpus,
                running=self.replied_with[wave][name].running,
                queued=self.replied_with[wave][name].queued,
                completed=self.replied_with[wave][name].completed,
                parents=self.topo.parents(name),
                children=self.topo.children(name),
                echo_parent=self.echo_parent[wave][name],
            )
            for name in self.names
        }
        assert {s.name: s for s in result.states} == expected
        check_spanning_tree(self.topo, {s.name: s.echo_parent for s in result.states})

    def check_finn_decided(self, wave: str) -> None:
        net, log = self.net, self.net.logs[wave]
        result = log.result
        assert isinstance(result, FinnResult)
        self.decided.add(wave)
        assert result.complete
        assert result.decided == tuple(sorted(self.names))
        for name in self.names:
            assert net.servers[name].decisions.count(wave) == 1
        assert log.decide_order[-1] == BALANCER
        assert Counter(log.decide_order) == Counter([*self.names, BALANCER])
        assert result.messages == log.messages
        if is_tree(self.topo):
            assert log.messages == self.topo.finn_edge_count
        else:
            assert log.messages >= self.topo.finn_edge_count

    # invariants ----------------------------------------------------------------------------

    @invariant()
    def nothing_after_a_decision_and_one_decision_each(self) -> None:
        for log in self.net.logs.values():
            assert log.sent_after_decision == 0
            assert log.decide_order.count(BALANCER) <= 1
            assert (log.result is None) == (log.wave not in self.decided)
        for server in self.net.servers.values():
            assert all(n == 1 for n in Counter(server.decisions).values())

    @invariant()
    def messages_are_accounted_for(self) -> None:
        in_flight = Counter(m.wave for _f, _t, m in self.net.in_flight)
        delivered = Counter(m.wave for _f, _t, m in self.delivered)
        for wave, log in self.net.logs.items():
            assert log.messages == in_flight[wave] + delivered[wave]

    @invariant()
    def loads_change_only_by_finn_work(self) -> None:
        for name, server in self.net.servers.items():
            extra = sum(self.work[w].tasks_per_node for w in server.decisions)
            assert server.queued == self.initial_queued[name] + extra
            assert server.running == server.completed == 0

    def teardown(self) -> None:
        if not hasattr(self, "net"):
            return
        for _ in range(50_000):  # far more than six waves on 25 servers can need
            if not self.net.in_flight:
                break
            self.deliver_checked(self.rng.randrange(len(self.net.in_flight)))
        assert not self.net.in_flight, "the waves never stop sending"
        self.nothing_after_a_decision_and_one_decision_each()
        self.messages_are_accounted_for()
        assert self.decided == set(self.waves), "every wave decides once nothing is in flight"
        for wave in self.waves:
            result = self.net.logs[wave].result
            assert result is not None
            assert result.complete
        for server in self.net.servers.values():
            assert sorted(server.decisions) == sorted(self.work)


WaveMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)
TestWaves = WaveMachine.TestCase


# --- plain tests: deadlines, dead servers, partial waves ------------------------------------


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


# --- plain tests: bad messages are refused and change nothing --------------------------------


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
