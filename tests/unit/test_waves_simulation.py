"""Echo and Finn through the in-memory network, under any delivery order.

The stateful test (`TestWaves`) draws a random rooted DAG, starts several Echo and Finn
waves at arbitrary moments, delivers *any* in-flight message at each step (hypothesis picks
the index), injects duplicates and foreign messages that must be rejected without changing
anything, and checks the algorithms' guarantees after every delivery. What it cannot reach
without a clock (dead servers, deadlines, each kind of bad message) is tested per machine
in test_echo.py, test_finn.py and test_node_protocol.py.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from tests.support.waves import (
    BUDGET,
    Load,
    WaveMsg,
    assert_rejected_unchanged,
    check_spanning_tree,
    inject,
    is_tree,
    load_now,
    network_digest,
)
from treewave.core.errors import RemoteProtocolError
from treewave.core.events import EchoResult, FinnResult
from treewave.core.messages import EchoExplore, EchoReply, FinnSets, FinnWork, ServerState
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER

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


def test_release_drops_finn_waves_without_changing_the_waves() -> None:
    # `release=True` (the simulator at scale) forgets a decided server's Finn wave once no
    # message can reach it: the same waves, message for message, with nothing held after.
    topology = random_topology(300, 4, TreeShape(max_children=3, extra_parents=40))
    nets = {}
    for release in (False, True):
        net = SimNetwork(topology, release=release)
        rng = random.Random(4)
        net.start_echo("e")
        net.run(rng)
        net.start_finn("f", FinnWork(tasks_per_node=1))
        net.run(rng)
        nets[release] = net
    kept, released = nets[False], nets[True]
    for wave in ("e", "f"):
        a, b = kept.logs[wave], released.logs[wave]
        assert (a.messages, a.decide_order, a.result) == (b.messages, b.decide_order, b.result)
    assert isinstance(released.logs["f"].result, FinnResult)
    assert released.logs["f"].result.complete
    assert all(not s.protocol.finn_waves for s in released.servers.values())
    assert all("f" in s.protocol.finished for s in released.servers.values())
    assert all(s.inbound == 0 for s in released.servers.values())
    assert all("f" in s.protocol.finn_waves for s in kept.servers.values())


def test_simulated_state_is_what_the_protocol_builds() -> None:
    # The simulator builds each server's state unvalidated; it must be the same state.
    topology = random_topology(30, 2, TreeShape(max_children=3, extra_parents=5))
    net = SimNetwork(topology)
    for name, server in net.servers.items():
        server.running, server.completed = 1, 4
        built = server.protocol.local_state(server.cpus, 1, server.queued, 4)
        assert server.state() == built, name
