"""The balancer machine without sockets: its effects carried out over a simulated network of
the real core `NodeProtocol`s and `TaskLedger`s (any delivery order, lost frames).

Example tests pin the rules one at a time (derived values recomputed on every adoption,
the rebalancing schedule, rounds, submissions, precedence of settings); a hypothesis state
machine interleaves waves, rounds, submissions, topology adoptions (growing, shrinking,
settings changes) and link losses, with the invariants: every task id in exactly one place;
a wave's deadline is the deadline rule applied to the topology and settings in force when
it started; the rebalance interval in force is the latest adopted one.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pydantic import ValidationError

from treewave.core.balancer.effects import (
    Effect,
    RoundFinished,
    SendTo,
    ServerRetired,
    SubmissionConfirmed,
    SubmissionTimedOut,
    TransferFinished,
    WaveFinished,
    WaveOutcome,
    WaveStarted,
)
from treewave.core.balancer.machine import BalancerMachine, CommandRefused, hop_budget_s
from treewave.core.deadlines import wave_deadline_s
from treewave.core.errors import ProtocolError
from treewave.core.events import FinnDecided, Send
from treewave.core.ledger import TRANSFER_REQUESTS, TaskLedger
from treewave.core.messages import (
    DrainReport,
    DrainRequest,
    EchoExplore,
    EchoReply,
    FinnSets,
    FinnWork,
    Message,
    ServerState,
    SubmitTasks,
    Task,
    TasksAccepted,
)
from treewave.core.migration import HoldState, Migration
from treewave.core.node import NodeProtocol
from treewave.core.precedence import SettingOverrides, effective_settings
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.topology import BALANCER, Settings, Topology
from treewave.core.transfersim import task_places

POOL = [f"s{i}" for i in range(8)]
WALL = 1_000_000.0
"""Wall clock minus monotonic clock in the simulation."""


def topology(names: list[str], seed: int = 0, **settings_: object) -> Topology:
    return random_topology(
        len(names),
        seed,
        TreeShape(max_children=2, extra_parents=1, cpus=(1, 2), tasks=(0, 0)),
        names=names,
        settings=Settings.model_validate(settings_),
    )


@dataclass
class SimServer:
    protocol: NodeProtocol
    cpus: int
    ledger: TaskLedger = field(default_factory=TaskLedger)
    held: bool = False
    drain_seq: int = 0

    def state(self) -> ServerState:
        queued = Counter(t.duration_s or 2.0 for t in self.ledger.queued)
        return self.protocol.local_state(
            self.cpus,
            len(self.ledger.running),
            len(self.ledger.queued),
            self.ledger.completed,
            queued_s=tuple(sorted(queued.items())),
        )


class SimCluster:
    """The machine and its servers; frames wait in `in_flight` until delivered or lost."""

    def __init__(self, topo: Topology, overrides: SettingOverrides | None = None) -> None:
        self.now = 0.0
        self.machine = BalancerMachine(
            Migration(topo, 1.0), overrides or SettingOverrides(), "t", 2.0, 0.0, WALL
        )
        self.servers: dict[str, SimServer] = {}
        self.in_flight: list[tuple[str, str, Message]] = []
        self.finished: dict[str, WaveOutcome] = {}
        self.started_under: dict[str, float] = {}
        """Wave id -> the deadline the rule gives for the topology in force at its start."""
        self.rounds: list[RoundFinished] = []
        self.confirmed: set[str] = set()
        self.timed_out: set[str] = set()
        self.transfers: dict[str, int] = {}
        self.retired: set[str] = set()
        self.finn_tasks = 0
        self.note: Callable[[str], None] = lambda _: None
        """What happened, for hypothesis' statistics (`event`, inside a test only)."""
        self._place(topo)
        for s in topo.names:
            self.apply(self.machine.link_up(s, self.now))

    def _place(self, topo: Topology) -> None:
        """Servers of `topo` run its view (the node's shell reloads on a change)."""
        for spec in topo.servers:
            old = self.servers.get(spec.name)
            proto = NodeProtocol(spec.name, topo)
            if old is None:
                self.servers[spec.name] = SimServer(proto, spec.cpus)
            else:
                old.protocol, old.cpus = proto, spec.cpus

    # --- the shell's part ---------------------------------------------------------------

    def apply(self, effects: list[Effect]) -> None:
        work = list(effects)
        while work:
            e = work.pop(0)
            if isinstance(e, SendTo):
                if e.to in self.servers and e.to not in self.retired:
                    self.in_flight.append((BALANCER, e.to, e.message))
                else:
                    work += self.machine.send_failed(e.to, e.message, self.now)
            elif isinstance(e, WaveStarted):
                m = self.machine
                self.started_under[e.initiator.wave] = wave_deadline_s(
                    m.settings.wave_timeout_s, m.topology.depth, len(m.topology)
                )
            elif isinstance(e, WaveFinished):
                assert e.outcome.wave_id not in self.finished, "a wave finished twice"
                self.note(f"a wave ended {'complete' if e.outcome.complete else 'partial'}")
                self.finished[e.outcome.wave_id] = e.outcome
            elif isinstance(e, RoundFinished):
                self.rounds.append(e)
                self.note("a round finished" + (" moving tasks" if any(e.moved) else ""))
            elif isinstance(e, SubmissionConfirmed):
                self.confirmed.add(e.first)
            elif isinstance(e, SubmissionTimedOut):
                self.timed_out.add(e.first)
            elif isinstance(e, TransferFinished):
                assert e.transfer not in self.transfers, "two results for one transfer"
                self.transfers[e.transfer] = e.moved
            elif isinstance(e, ServerRetired):
                held = self.servers[e.server].ledger.task_ids()
                assert not any(held[w] for w in ("queued", "running", "reserved")), held
                self.retired.add(e.server)
                self.note("a server retired")

    def deliver(self, i: int) -> None:
        sender, to, msg = self.in_flight.pop(i)
        if to == BALANCER:
            try:
                effects = self.machine.receive(sender, msg, self.now, self.now + WALL)
            except ProtocolError:
                return
            self.apply(effects)
            return
        self._to_server(sender, self.servers[to], msg)

    def drop(self, i: int) -> None:
        """The frame is lost with its link; the balancer redials the server."""
        sender, to, _ = self.in_flight.pop(i)
        server = to if sender == BALANCER else sender
        if server not in self.retired:
            self.apply(self.machine.link_up(server, self.now))

    def _to_server(self, sender: str, s: SimServer, msg: Message) -> None:
        name = s.protocol.name
        reply: Message | None = None
        if isinstance(msg, (EchoExplore, EchoReply, FinnSets)):
            if s.held:
                return  # leaving the topology: it takes no part in waves (as the node)
            try:
                out = s.protocol.receive(msg, self.now, s.state(), self.now + WALL)
            except ProtocolError:
                return
            for item in out:
                if isinstance(item, FinnDecided):
                    n = item.work.tasks_per_node
                    self.finn_tasks += 1
                    s.ledger.submit(
                        [Task(id=f"{item.wave}.{name}.{k}", duration_s=2.0) for k in range(n)]
                    )
                elif isinstance(item, Send):
                    self.in_flight.append((name, item.to, item.message))
        elif isinstance(msg, TRANSFER_REQUESTS):
            reply = s.ledger.answer(msg, self.now, held=s.held)
        elif isinstance(msg, SubmitTasks):
            if s.held:
                return  # it takes no new tasks (the node answers an error)
            reply = TasksAccepted(first=msg.tasks[0].id, added=s.ledger.submit(msg.tasks))
        elif isinstance(msg, DrainRequest):
            state = HoldState(s.held, s.drain_seq)
            applies = state.applies(msg.seq)
            requeued = s.ledger.requeue_running() if applies and msg.requeue_running else 0
            state = state.after(msg.hold, msg.seq)
            s.held, s.drain_seq = state.held, state.seq
            reply = DrainReport(
                held=s.held, requeued=requeued, answers=msg.seq, **s.ledger.drain_counts()
            )
        if reply is not None:
            self.in_flight.append((name, BALANCER, reply))

    def tick(self, dt: float) -> None:
        self.now += dt
        for s in self.servers.values():
            out = s.protocol.handle_timer(self.now, s.state())
            self.in_flight += [
                (s.protocol.name, o.to, o.message) for o in out if isinstance(o, Send)
            ]
        self.apply(self.machine.handle_timer(self.now, self.now + WALL))

    def settle(self, rounds: int = 200) -> None:
        """Deliver everything, in order, ticking past deadlines until nothing is pending."""
        for _ in range(rounds):
            delivered = 0
            while self.in_flight:
                # Bounded: a livelock (messages causing messages at one instant) fails
                # with what is in flight instead of hanging the test run.
                delivered += 1
                assert delivered <= 100_000, f"no quiescence, in flight: {self.in_flight[:4]}"
                self.deliver(0)
            m = self.machine
            due = m.next_deadline()
            if not m.waves and m.round is None and due in (None, m.next_round_at):
                return  # nothing left but the next periodic round
            assert due is not None
            self.tick(max(0.0, due - self.now) + 1e-6)

    # --- commands ------------------------------------------------------------------------

    def echo(self) -> str:
        wave, effects = self.machine.start_echo("api", self.now)
        self.apply(effects)
        return wave

    def adopt(self, topo: Topology, overrides: SettingOverrides | None = None) -> bool:
        changed, effects = self.machine.adopt(topo, self.now, self.now + WALL, overrides)
        self._place(topo)
        for name in topo.names:
            if name not in self.machine.links_up:
                self.apply(self.machine.link_up(name, self.now))
        self.apply(effects)
        return changed

    def places(self) -> dict[str, list[str]]:
        return task_places({name: s.ledger for name, s in self.servers.items()})


# --- settings precedence --------------------------------------------------------------------


def test_flag_beats_environment_beats_file_beats_default() -> None:
    file = Settings(wave_timeout_s=7.0)
    flag = SettingOverrides(rebalance_interval_s=1.5)
    env = SettingOverrides(rebalance_interval_s=9.0, wave_timeout_s=3.0)
    got = effective_settings(file, flag, env)
    assert got.rebalance_interval_s == 1.5  # the flag
    assert got.wave_timeout_s == 3.0  # the environment, over the file's 7
    assert got.task_time_s == Settings().task_time_s  # the default
    assert effective_settings(file).wave_timeout_s == 7.0  # the file
    assert effective_settings(file, SettingOverrides()) is file


def test_an_override_is_validated_like_the_file() -> None:
    with pytest.raises(ValidationError, match="unknown policy 'nope' \\(known: lpt"):
        effective_settings(Settings(), SettingOverrides(policy="nope"))
    with pytest.raises(ValidationError):
        effective_settings(Settings(), SettingOverrides(wave_timeout_s=0.0))


def test_unknown_policy_in_a_topology_file_names_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="known: lpt"):
        Settings.model_validate({"policy": "fifo"})


# --- derived values -------------------------------------------------------------------------


def test_adopting_new_settings_changes_deadline_and_interval_at_once() -> None:
    names = POOL[:4]
    sim = SimCluster(topology(names, wave_timeout_s=5.0, rebalance_interval_s=5.0))
    assert sim.machine.wave_deadline_s == 5.0
    assert sim.machine.rebalance_interval_s == 5.0
    sim.tick(1.0)
    assert sim.adopt(topology(names, wave_timeout_s=9.0, rebalance_interval_s=2.0))
    assert sim.machine.wave_deadline_s == 9.0
    assert sim.machine.rebalance_interval_s == 2.0
    assert sim.machine.next_round_at == pytest.approx(0.0 + 2.0)
    wave = sim.echo()
    assert sim.machine.waves[wave].initiator.deadline == pytest.approx(sim.now + 9.0)
    sim.settle()
    assert sim.finished[wave].complete
    assert sim.finished[wave].deadline_s == 9.0


def test_growing_the_tree_grows_the_wave_deadline_and_hop_budget() -> None:
    small = topology(POOL[:3], wave_timeout_s=1.0)
    sim = SimCluster(small)
    assert sim.machine.wave_deadline_s == wave_deadline_s(1.0, small.depth, 3)
    big = random_topology(300, 7, TreeShape(max_children=3), settings=Settings(wave_timeout_s=1))
    sim.adopt(big)
    assert sim.machine.wave_deadline_s == wave_deadline_s(1.0, big.depth, 300)
    assert sim.machine.wave_deadline_s > wave_deadline_s(1.0, small.depth, 3)
    assert sim.machine.hop_s == hop_budget_s(sim.machine.wave_deadline_s, big.depth)


def test_flags_win_over_a_newly_adopted_file() -> None:
    names = POOL[:3]
    flags = SettingOverrides(rebalance_interval_s=0.0, wave_timeout_s=4.0)
    sim = SimCluster(topology(names), flags)
    sim.adopt(topology(names, wave_timeout_s=20.0, rebalance_interval_s=3.0))
    assert sim.machine.wave_deadline_s == 4.0
    assert sim.machine.rebalance_interval_s == 0.0
    assert sim.machine.next_round_at is None


def test_a_periodic_round_runs_at_the_interval_and_balances() -> None:
    names = POOL[:4]
    topo = topology(names, rebalance_interval_s=3.0, task_time_s=1.0)
    sim = SimCluster(topo)
    hot = topo.root
    ids, effects = sim.machine.submit(hot, 12, 1.0, None, sim.now)
    sim.apply(effects)
    while sim.in_flight:
        sim.deliver(0)
    assert ids[0] in sim.confirmed
    # New work: the round starts at once, not at the next tick.
    assert sim.machine.next_round_at == sim.now
    sim.tick(0.0)
    assert sim.machine.round is not None
    assert sim.machine.round.periodic
    sim.settle()
    (done,) = sim.rounds
    assert done.policy == "lpt"
    assert done.planned
    assert sum(done.moved) > 0
    assert done.after.wave_id != done.before.wave_id
    assert sim.machine.next_round_at == pytest.approx(sim.now + 3.0, abs=0.01)
    assert len(sim.places()) == 12


def test_an_api_round_during_another_waits_for_it() -> None:
    sim = SimCluster(topology(POOL[:3], rebalance_interval_s=0))
    first, effects = sim.machine.start_rebalance(sim.now)
    sim.apply(effects)
    second, later = sim.machine.start_rebalance(sim.now)
    assert later == []
    sim.settle()
    assert [r.round_id for r in sim.rounds] == [first, second]
    assert all(not r.planned for r in sim.rounds)  # nothing queued: nothing to move


def test_a_submission_unanswered_times_out_and_one_to_a_stranger_is_refused() -> None:
    sim = SimCluster(topology(POOL[:3]))
    ids, effects = sim.machine.submit(POOL[1], 2, None, None, sim.now)
    sim.apply(effects)
    sim.in_flight.clear()  # lost
    sim.tick(2.5)
    assert ids[0] in sim.timed_out
    assert ids[0] not in sim.confirmed
    with pytest.raises(CommandRefused) as refused:
        sim.machine.submit("zed", 1, None, None, sim.now)
    assert refused.value.reason == "unknown"


def test_an_unreachable_root_ends_the_wave_at_once() -> None:
    topo = topology(POOL[:3])
    sim = SimCluster(topo)
    sim.retired.add(topo.root)  # no link: the send fails
    wave = sim.echo()
    assert not sim.finished[wave].complete
    assert not sim.machine.waves


def test_shrinking_drains_and_retires_by_timers() -> None:
    names = POOL[:5]
    sim = SimCluster(topology(names, drain_grace_s=0.0, rebalance_interval_s=0))
    leaving = [n for n in names if n != sim.machine.topology.root][-2:]
    for n in leaving:
        sim.servers[n].ledger.submit([Task(id=f"{n}.{k}", duration_s=1.0) for k in range(3)])
    sim.adopt(topology([n for n in names if n not in leaving], 1, rebalance_interval_s=0))
    sim.settle(500)
    assert sim.retired == set(leaving)
    assert sim.machine.migration.retiring == frozenset()
    where = sim.places()
    assert len(where) == 6
    assert all(len(w) == 1 for w in where.values())
    assert not any(w[0].startswith(tuple(leaving)) for w in where.values())


def test_the_timer_makes_progress_when_the_two_clocks_drift_apart() -> None:
    """The drain's deadlines are wall-clock times: a timer fired at its monotonic
    conversion must do the drain's work even if the wall clock, read a moment apart,
    is a hair behind (or it would fire again at once, forever)."""
    names = POOL[:3]
    sim = SimCluster(topology(names, rebalance_interval_s=0))
    sim.adopt(topology(names[:2], 1, rebalance_interval_s=0))  # one server retiring
    sim.in_flight.clear()
    m = sim.machine
    for _ in range(5):
        due = m.next_deadline()
        probe_due = m.migration.next_deadline()
        assert due is not None
        assert probe_due is not None
        behind = due + WALL - 1e-4  # the wall clock lags the conversion a little
        sim.apply(m.handle_timer(due, behind))
        later = m.migration.next_deadline()
        assert later is not None
        assert later > probe_due, "the drain's timer fired but did nothing"


# --- everything interleaved -----------------------------------------------------------------

name_sets = st.lists(st.sampled_from(POOL), min_size=1, max_size=6, unique=True)


class BalancerUnderChange(RuleBasedStateMachine):
    sim: SimCluster

    @initialize(names=name_sets, seed=st.integers(0, 100))
    def setup(self, names: list[str], seed: int) -> None:
        self.seed = seed
        self.sim = SimCluster(topology(names, seed, drain_grace_s=2.0))
        self.sim.note = event
        self.interval = self.sim.machine.rebalance_interval_s
        self.submitted: set[str] = set()

    @rule()
    def echo(self) -> None:
        self.sim.echo()

    @rule(n=st.integers(0, 2))
    def finn(self, n: int) -> None:
        _, effects = self.sim.machine.start_finn(
            FinnWork(tasks_per_node=n), self.sim.now, self.sim.now + WALL
        )
        self.sim.apply(effects)

    @rule(i=st.integers(0, 10), count=st.integers(1, 24))
    def submit(self, i: int, count: int) -> None:
        names = self.sim.machine.topology.names
        try:
            _, effects = self.sim.machine.submit(
                names[i % len(names)], count, 1.0, None, self.sim.now
            )
        except CommandRefused:
            return
        self.sim.apply(effects)

    @rule()
    def rebalance(self) -> None:
        self.sim.apply(self.sim.machine.start_rebalance(self.sim.now)[1])

    @rule(
        names=name_sets,
        timeout=st.sampled_from([1.0, 5.0, 9.0]),
        interval=st.sampled_from([0.0, 2.0, 5.0]),
    )
    def adopt(self, names: list[str], timeout: float, interval: float) -> None:
        # Any server may come back, even one still retiring or being released: its held
        # report can overtake its release, and only the request numbers tell that old
        # answer from the answer to a newer hold. A retired one stays away (it may be
        # stopped; test_migration.py covers a retired server that comes back).
        names = [n for n in names if n not in self.sim.retired]
        names = names or [n for n in POOL if n not in self.sim.retired][:1]
        if not names:
            return
        self.seed += 1
        topo = topology(
            names,
            self.seed,
            wave_timeout_s=timeout,
            rebalance_interval_s=interval,
            drain_grace_s=2.0,
        )
        if self.sim.adopt(topo):
            self.interval = interval

    @rule(i=st.integers(0, 1000), how=st.sampled_from(["deliver", "deliver", "deliver", "drop"]))
    def frame(self, i: int, how: str) -> None:
        if self.sim.in_flight:
            i %= len(self.sim.in_flight)
            (self.sim.deliver if how == "deliver" else self.sim.drop)(i)

    @rule(order=st.randoms(use_true_random=False))
    def deliver_everything(self, order: random.Random) -> None:
        """Every frame in flight, and what they cause, in a random order."""
        for _ in range(10_000):
            if not self.sim.in_flight:
                return
            self.sim.deliver(order.randrange(len(self.sim.in_flight)))

    @rule(dt=st.sampled_from([0.25, 1.0, 3.0]))
    def tick(self, dt: float) -> None:
        self.sim.tick(dt)

    @rule(i=st.integers(0, 10), finish=st.booleans())
    def work(self, i: int, finish: bool) -> None:
        s = self.sim.servers[sorted(self.sim.servers)[i % len(self.sim.servers)]]
        if finish and s.ledger.running:
            s.ledger.finish(next(iter(s.ledger.running)))
        elif not s.held and len(s.ledger.running) < s.cpus:
            s.ledger.start_next(self.sim.now)

    @invariant()
    def every_task_in_exactly_one_place(self) -> None:
        twice = {t: w for t, w in self.sim.places().items() if len(w) > 1}
        assert not twice, f"tasks in two places: {twice}"
        known = set(self.sim.places())
        assert self.submitted <= known, f"lost {sorted(self.submitted - known)}"
        self.submitted = known

    @invariant()
    def waves_run_under_the_rule_of_their_start(self) -> None:
        for wave, outcome in self.sim.finished.items():
            assert outcome.deadline_s == self.sim.started_under[wave], wave
        for wave, w in self.sim.machine.waves.items():
            assert w.deadline_s == self.sim.started_under[wave], wave

    @invariant()
    def the_interval_in_force_is_the_latest_adopted(self) -> None:
        m = self.sim.machine
        assert m.rebalance_interval_s == self.interval
        if self.interval == 0:
            assert m.next_round_at is None

    def teardown(self) -> None:
        if not hasattr(self, "sim"):
            return
        self.sim.settle(400)
        assert not self.sim.machine.waves, "a wave never ended"
        assert self.sim.machine.round is None, "a round never ended"
        self.every_task_in_exactly_one_place()


BalancerUnderChange.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_balancer_under_change = BalancerUnderChange.TestCase
