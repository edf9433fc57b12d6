"""The topology-change protocol (`core.migration`) against simulated servers.

The stateful test draws a random topology A with random queued and running tasks and
adopts a random topology B (overlapping names, new names, removed names). Servers are real
`TaskLedger`s plus a persisted hold flag, as in the node; a simple synchronous executor
carries the machine's intents out (a transfer may succeed, fail before anything happened,
or stop after the prepare and stay *in doubt* until resolved). Hypothesis then picks, at
every step, any pending intent (in order per server, as on its link) or outcome to
deliver, or a clock tick, a task finishing,
a server crash (its ledger goes through JSON: running tasks come back queued), a balancer
crash (the machine goes through JSON and every message in flight is lost), fresh target
loads, or a newer topology C superseding the migration mid-way.

Checked throughout: a server is told `Retired` only when it holds nothing and nothing of
it is in doubt. At quiescence (everything delivered, doubts resolved, the clock past every
grace): the machine is steady, every removed server is retired and empty, the servers of
the final topology are not held, no reservation is left, and every task id exists exactly
once (queued, running, or completed once) across all servers, retired ones included.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.support.migration import drain_topology
from treewave.core.errors import LocalProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.ledger import TaskLedger
from treewave.core.messages import Task
from treewave.core.migration import (
    HoldServer,
    HoldState,
    Intent,
    Migration,
    MigrationPhase,
    MoveQueued,
    Outcome,
    ReleaseServer,
    RequeueRunning,
    Retired,
    ServerReport,
    TargetLoads,
    TransferDone,
)
from treewave.core.policy import Load, plan_drain
from treewave.core.topology import ServerSpec, Settings, Topology

POOL = [f"s{i}" for i in range(10)]
PROBE_S = 1.0


@dataclass
class SimServer:
    name: str
    cpus: int
    ledger: TaskLedger = field(default_factory=TaskLedger)
    held: bool = False
    retired: bool = False

    def report(self, in_doubt: int, requeued: int = 0, answers: int = 0) -> ServerReport:
        return ServerReport(
            server=self.name,
            held=self.held,
            requeued=requeued,
            in_doubt=in_doubt,
            answers=answers,
            **self.ledger.drain_counts(),
        )

    def start_tasks(self) -> None:
        while not self.held and len(self.ledger.running) < self.cpus:
            if self.ledger.start_next() is None:
                break


@dataclass
class Doubt:
    transfer: str
    source: str
    target: str


name_sets = st.lists(st.sampled_from(POOL), min_size=1, max_size=6, unique=True)


class MigrationWorld(RuleBasedStateMachine):
    @initialize(
        a=name_sets,
        b=name_sets,
        seed=st.integers(0, 1000),
        grace=st.sampled_from([0.0, 2.0, 5.0]),
        queues=st.lists(st.integers(0, 12), min_size=6, max_size=6),
        running=st.lists(st.integers(0, 3), min_size=6, max_size=6),
    )
    def setup(
        self,
        a: list[str],
        b: list[str],
        seed: int,
        grace: float,
        queues: list[int],
        running: list[int],
    ) -> None:
        self.now = 1000.0
        self.seed = seed
        self.grace = grace
        self.servers: dict[str, SimServer] = {}
        self.ids: set[str] = set()
        self.intents: list[Intent] = []
        self.outcomes: list[Outcome] = []
        self.report_epochs: dict[int, int] = {}
        """id() of a pending report -> its server's move epoch when it was made."""
        self.move_epochs: Counter[str] = Counter()
        """Moves executed with each server as donor or recipient."""
        self.doubts: list[Doubt] = []
        self.transfers = 0
        self.superseded = False
        self.removed_ever: set[str] = set()
        self.done_on_retired: set[str] = set()
        """Tasks completed on a retired server that later came back with new storage."""
        topo_a = drain_topology(a, seed, grace)
        for i, spec in enumerate(topo_a.servers):
            server = self.add_server(spec)
            tasks = [Task(id=f"{spec.name}:t{k}", duration_s=1.0) for k in range(queues[i])]
            server.ledger.submit(tasks)
            self.ids.update(t.id for t in tasks)
            for _ in range(min(running[i], spec.cpus)):
                server.ledger.start_next()
        self.machine = Migration(topo_a, probe_interval_s=PROBE_S)
        self.adopt(drain_topology(b, seed + 1, grace))

    # --- helpers --------------------------------------------------------------------------

    def add_server(self, spec: ServerSpec) -> SimServer:
        server = self.servers.get(spec.name)
        if server is None or server.retired:
            if server is not None:
                # Its storage went with it: what it completed is done, not lost.
                self.done_on_retired.update(server.ledger.task_ids()["completed"])
            server = SimServer(spec.name, spec.cpus)
            self.servers[spec.name] = server
        return server

    def adopt(self, desired: Topology) -> None:
        for spec in desired.servers:
            self.add_server(spec)
        self.removed_ever |= set(self.machine.topology.names) - set(desired.names)
        self.intents += self.machine.adopt(desired, self.now)

    def in_doubt(self, name: str) -> int:
        return sum(1 for d in self.doubts if name in (d.source, d.target))

    def balancer_in_doubt(self, report: ServerReport) -> int:
        """What the balancer's coordinator would count for `report` on its arrival: the
        transfers in doubt, those whose prepare is still on its way (a pending move), and
        one that ran after the report was made (on the real links the report arrives
        before the transfer's own answers from that server, so it is still in flight)."""
        name = report.server
        pending = sum(
            1 for i in self.intents if isinstance(i, MoveQueued) and name in (i.source, i.target)
        )
        made_at = self.report_epochs.pop(id(report), self.move_epochs[name])
        overtaken = 1 if made_at < self.move_epochs[name] else 0
        return self.in_doubt(name) + pending + overtaken

    def feed(self, outcome: Outcome) -> None:
        if isinstance(outcome, ServerReport):
            outcome = dataclasses.replace(outcome, in_doubt=self.balancer_in_doubt(outcome))
        with contextlib.suppress(StaleMessage):
            self.intents += self.machine.receive(outcome, self.now)

    def execute(self, intent: Intent, mode: str = "ok") -> None:
        if isinstance(intent, MoveQueued):
            self.move(intent, mode)
            return
        if isinstance(intent, Retired):
            if intent.server in self.machine.topology:
                return  # stale: a newer topology brought it back (and releases it)
            self.retire(intent.server)
            return
        server = self.servers[intent.server]
        if server.retired:
            return  # stopped: a request sent before it retired finds nobody
        requeued = 0
        if isinstance(intent, ReleaseServer):
            server.held = False
            server.start_tasks()
        else:
            assert isinstance(intent, (HoldServer, RequeueRunning))
            server.held = True
            if isinstance(intent, RequeueRunning):
                requeued = server.ledger.requeue_running()
        report = server.report(0, requeued, intent.seq)  # in_doubt is the balancer's, on arrival
        self.report_epochs[id(report)] = self.move_epochs[server.name]
        self.outcomes.append(report)

    def move(self, move: MoveQueued, mode: str) -> None:
        source, target = self.servers[move.source], self.servers[move.target]
        self.move_epochs[move.source] += 1
        self.move_epochs[move.target] += 1
        moved = 0
        if mode != "fail":
            self.transfers += 1
            tid = f"x{self.transfers}"
            reservation = source.ledger.prepare(tid, move.target, move.count, self.now)
            if reservation.tasks:
                if mode == "doubt":
                    self.doubts.append(Doubt(tid, move.source, move.target))
                elif target.held or target.retired:
                    # A held server cancels deliveries: the donor takes its tasks back.
                    assert target.ledger.cancel(tid) == "cancelled"
                    source.ledger.abort(tid)
                else:
                    assert target.ledger.deliver(tid, reservation.tasks) == "accepted"
                    assert source.ledger.commit(tid) == "committed"
                    moved = len(reservation.tasks)
                    target.start_tasks()
        self.outcomes.append(TransferDone(move.source, move.target, moved))

    def resolve(self, doubt: Doubt) -> None:
        """The balancer's in-doubt resolution: cancel at the recipient, then settle."""
        self.doubts.remove(doubt)
        source, target = self.servers[doubt.source], self.servers[doubt.target]
        assert not source.retired, "a retired server was in doubt"
        assert not target.retired, "a retired server was in doubt"
        if target.ledger.cancel(doubt.transfer) == "accepted":
            source.ledger.commit(doubt.transfer)
        else:
            source.ledger.abort(doubt.transfer)

    def retire(self, name: str) -> None:
        server = self.servers[name]
        if server.retired:
            return
        led = server.ledger
        assert name not in self.machine.topology, f"{name} retired but in the topology"
        held = led.task_ids()
        assert held["queued"] + held["running"] + held["reserved"] == [], (
            f"{name} retired while holding {held}"
        )
        assert self.in_doubt(name) == 0, f"{name} retired with a transfer in doubt"
        server.retired = True

    # --- rules ----------------------------------------------------------------------------

    @precondition(lambda self: self.intents)
    @rule(data=st.data(), mode=st.sampled_from(["ok", "ok", "fail", "doubt"]))
    def deliver_intent(self, data: st.DataObject, mode: str) -> None:
        # Requests to one server travel in order on its link; across servers, any order.
        firsts: dict[str, int] = {}
        for i, intent in enumerate(self.intents):
            key = intent.source if isinstance(intent, MoveQueued) else intent.server
            firsts.setdefault(key, i)
        i = data.draw(st.sampled_from(sorted(firsts.values())), label="intent")
        self.execute(self.intents.pop(i), mode)

    @precondition(lambda self: self.outcomes)
    @rule(data=st.data())
    def deliver_outcome(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.outcomes) - 1), label="outcome")
        self.feed(self.outcomes.pop(i))

    @precondition(lambda self: self.doubts)
    @rule(data=st.data())
    def resolve_doubt(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.doubts) - 1), label="doubt")
        self.resolve(self.doubts[i])

    @rule(dt=st.sampled_from([0.3, 1.0, 3.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.intents += self.machine.handle_timer(self.now)

    @rule(data=st.data())
    def finish_a_task(self, data: st.DataObject) -> None:
        busy = sorted(n for n, s in self.servers.items() if s.ledger.running)
        if not busy:
            return
        server = self.servers[data.draw(st.sampled_from(busy), label="server")]
        server.ledger.finish(data.draw(st.sampled_from(sorted(server.ledger.running))))
        server.start_tasks()

    @rule(data=st.data())
    def crash_a_server(self, data: st.DataObject) -> None:
        """Restart from the persisted state: running tasks come back queued."""
        server = self.servers[data.draw(st.sampled_from(sorted(self.servers)), label="crash")]
        server.ledger = TaskLedger.from_json_data(server.ledger.to_json_data())
        server.start_tasks()

    @rule()
    def crash_the_balancer(self) -> None:
        """Everything in flight is lost; the machine comes back from its saved JSON, and
        the shell carries out the retirements it may not have finished."""
        self.machine = Migration.from_json_data(self.machine.to_json_data())
        self.intents.clear()
        self.outcomes.clear()
        self.report_epochs.clear()
        for name in self.machine.retired:
            self.retire(name)

    @rule()
    def target_loads(self) -> None:
        loads = tuple(
            Load(
                n,
                self.servers[n].cpus,
                tuple(t.duration_s for t in s.running.values()),
                tuple(t.duration_s for t in s.queued),
            )
            for n in self.machine.topology.names
            if (s := self.servers[n].ledger)
        )
        self.feed(TargetLoads(loads))

    @precondition(lambda self: not self.superseded)
    @rule(c=name_sets)
    def supersede(self, c: list[str]) -> None:
        self.superseded = True
        self.adopt(drain_topology(c, self.seed + 2, self.grace))

    # --- checks ---------------------------------------------------------------------------

    @invariant()
    def every_task_exactly_once(self) -> None:
        if not hasattr(self, "servers"):
            return
        places: Counter[str] = Counter()
        for s in self.servers.values():
            ids = s.ledger.task_ids()
            places.update(ids["queued"] + ids["running"] + ids["reserved"] + ids["completed"])
        places.update(self.done_on_retired)
        assert set(places) == self.ids, (self.ids - set(places), set(places) - self.ids)
        twice = [t for t, n in places.items() if n > 1]
        assert not twice, twice

    def teardown(self) -> None:
        if not hasattr(self, "servers"):
            return
        for _ in range(500):
            for doubt in list(self.doubts):
                self.resolve(doubt)
            while self.outcomes or self.intents:
                if self.outcomes:
                    self.feed(self.outcomes.pop(0))
                else:
                    self.execute(self.intents.pop(0))
            if self.machine.phase is MigrationPhase.STEADY and not self.machine.releasing:
                break
            self.now += PROBE_S
            self.intents += self.machine.handle_timer(self.now)
        else:
            raise AssertionError(f"no quiescence: {self.machine.status(self.now)}")
        final = self.machine.topology
        for name, s in self.servers.items():
            if name in final:
                assert not s.retired, f"{name} is in the topology but retired"
                assert not s.held, f"{name} is in the topology but held"
            elif name in self.removed_ever:
                assert s.retired, f"{name} left the topology but never retired"
            assert not s.ledger.reserved, f"{name} keeps a reservation"
        self.every_task_exactly_once()


TestMigration = MigrationWorld.TestCase
TestMigration.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- plain tests ---------------------------------------------------------------------------


def topo(*servers: tuple[str, int, tuple[str, ...]], grace: float = 10.0) -> Topology:
    return Topology.from_servers(
        [ServerSpec(name=n, cpus=c, children=k) for n, c, k in servers],
        Settings(drain_grace_s=grace),
    )


A = topo(("root", 1, ("old", "keep")), ("old", 2, ()), ("keep", 1, ()))
B = topo(("root", 1, ("keep", "new")), ("keep", 1, ()), ("new", 3, ()))


def current(m: Migration, server: str, *counts: int, **fields: int) -> ServerReport:
    """A report answering the latest request `m` sent to `server`."""
    held, *rest = counts
    report = ServerReport(server, bool(held), *rest, **fields)
    return dataclasses.replace(report, answers=m.latest_request(server))


def test_a_removed_server_is_held_drained_to_the_least_pressed_and_retired() -> None:
    m = Migration(A)
    # Each phase read into a variable: asserting on `m.phase` itself would narrow that
    # expression for mypy, which cannot see a later call change it.
    initial: MigrationPhase = m.phase
    assert initial is MigrationPhase.STEADY
    assert m.adopt(B, 0.0) == [HoldServer("old")]
    adopted: MigrationPhase = m.phase
    assert adopted is MigrationPhase.DRAINING
    assert m.retiring == {"old"}
    busy = Load("keep", 1, (1.0,), (1.0, 1.0, 1.0))
    m.receive(TargetLoads((Load("root", 1), busy)), 0.0)
    moves = m.receive(current(m, "old", True, queued=6, running=1, reserved=0), 0.1)
    # "new" (3 idle cpus) takes most, idle "root" one; "keep" (pressed) nothing.
    assert moves == [MoveQueued("old", "new", 5), MoveQueued("old", "root", 1)]
    assert m.receive(TransferDone("old", "new", 5), 0.2) == []
    assert m.receive(TransferDone("old", "root", 1), 0.3) == [HoldServer("old")]
    # Still running one task: not retired, nothing to move.
    assert m.receive(current(m, "old", True, 0, 1, 0, transferred_out=6), 0.4) == []
    assert m.handle_timer(1.0) == []  # the next probe is due at 1.3
    assert m.handle_timer(1.3) == [HoldServer("old")]
    # Past the grace with a task still running: requeue it.
    assert m.handle_timer(10.0) == [RequeueRunning("old")]
    out = m.receive(current(m, "old", True, 1, 0, 0, transferred_out=6, requeued=1), 10.1)
    assert out == [MoveQueued("old", "new", 1)]
    m.receive(TransferDone("old", "new", 1), 10.2)
    assert m.receive(current(m, "old", True, 0, 0, 0, transferred_out=7), 10.3) == [Retired("old")]
    assert m.phase is MigrationPhase.STEADY
    assert m.status(11.0).model_dump()["retired"] == {
        "old": {"moved": 7, "completed": 0, "requeued": 1}
    }


def test_not_retired_before_the_hold_nor_with_a_transfer_in_doubt() -> None:
    m = Migration(A)
    m.adopt(B, 0.0)
    assert m.receive(current(m, "old", False, 0, 0, 0), 0.1) == []
    assert m.receive(current(m, "old", True, 0, 0, 0, in_doubt=1), 0.2) == []
    assert m.receive(current(m, "old", True, 0, 0, 0), 0.3) == [Retired("old")]


def test_a_newer_topology_releases_a_retiring_server_that_comes_back() -> None:
    m = Migration(A)
    m.adopt(B, 0.0)
    hold = m.latest_request("old")
    m.receive(current(m, "old", True, 4, 0, 0), 0.1)
    out = m.adopt(A, 0.5)
    assert out == [ReleaseServer("old"), HoldServer("new")]
    assert m.retiring == {"new"}
    assert m.releasing == {"old"}
    # Its move in flight is stale now; reports keep the release going until it is lifted.
    with pytest.raises(StaleMessage):
        m.receive(TransferDone("old", "new", 4), 0.6)
    assert m.receive(current(m, "old", True, 0, 0, 0), 0.7) == []
    assert m.handle_timer(1.5) == [HoldServer("new"), ReleaseServer("old")]
    m.receive(current(m, "old", False, 0, 0, 0), 1.6)
    assert m.releasing == frozenset()
    # A late answer to the hold (it overtook the release) is stale: nothing to undo.
    with pytest.raises(StaleMessage, match="answers request 1, not the latest"):
        m.receive(ServerReport("old", True, 0, 0, 0, answers=hold), 1.7)
    assert m.releasing == frozenset()
    assert m.adopt(A, 2.0) == []  # the same topology again changes nothing


def test_no_move_to_a_server_still_being_released() -> None:
    """A server that comes back is held until its release gets through, and a held server
    refuses deliveries: planning drained tasks onto it would fail and be planned again at
    once, over and over (found by the stateful test over the real coordinator: its
    release lost with a crash, the move to it looped). Moves wait for the release."""
    m = Migration(A)
    m.adopt(B, 0.0)  # "old" retiring
    back = topo(("old", 2, ()))  # "old" comes back alone: "root" and "keep" retire
    out = m.adopt(back, 1.0)
    assert ReleaseServer("old") in out
    assert m.releasing == {"old"}
    # "keep" reports queued tasks; the only server of the topology is still held.
    assert m.receive(current(m, "keep", True, 3, 0, 0), 1.1) == []
    assert m.receive(current(m, "old", True, 0, 0, 0), 1.2) == []  # release not through
    # Its release is through: the waiting tasks go to it at once.
    assert m.receive(current(m, "old", False, 0, 0, 0), 1.3) == [MoveQueued("keep", "old", 3)]
    assert m.releasing == frozenset()


def test_it_resumes_from_json_after_a_restart() -> None:
    m = Migration(A)
    m.adopt(B, 100.0)
    m.receive(current(m, "old", True, 3, 1, 0, transferred_out=2), 100.1)
    saved = m.to_json_data()
    back = Migration.from_json_data(saved)
    assert back.to_json_data() == saved
    assert back.retiring == {"old"}
    assert back.topology == B
    # Moves in flight are forgotten; the next report plans again; the grace still counts
    # from the original start.
    assert back.handle_timer(110.0) == [RequeueRunning("old")]


def test_bad_inputs_change_nothing() -> None:
    m = Migration(A)
    m.adopt(B, 0.0)
    before = m.to_json_data()
    with pytest.raises(RemoteProtocolError, match="counts"):
        m.receive(current(m, "old", True, -1, 0, 0), 0.1)
    with pytest.raises(StaleMessage):
        m.receive(current(m, "keep", False, 0, 0, 0), 0.1)
    m.receive(current(m, "old", True, 2, 0, 0), 0.1)
    with pytest.raises(RemoteProtocolError, match="moved 5 of 2"):
        m.receive(TransferDone("old", "new", 5), 0.2)
    with pytest.raises(LocalProtocolError):
        m.receive("report", 0.2)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        m.adopt({"servers": []}, 0.2)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="damaged"):
        Migration.from_json_data({**before, "retiring": {"keep": {}}})
    assert m.retiring == {"old"}
    assert before["topology"] == m.to_json_data()["topology"]


def test_plan_drain_fills_the_least_pressed_first() -> None:
    targets = [Load("a", 1), Load("b", 4), Load("c", 2, (1.0, 1.0), (1.0, 1.0))]
    moves = plan_drain({"x": 9}, targets, 1.0, max_per_move=3)
    got = Counter[str]()
    for mv in moves:
        assert mv.source == "x"
        assert 1 <= mv.tasks <= 3
        got[mv.target] += mv.tasks
    assert sum(got.values()) == 9
    # Water-filling: b (4 cpus) to 7/4, a to 2, c (already at pressure 2) nothing; the
    # last task's tie (a or b at 2.0) goes by name.
    assert got == {"a": 2, "b": 7}


def test_a_retired_server_that_comes_back_is_released() -> None:
    # Its hold outlives the retirement (the shell may not have stopped it yet, or its
    # storage survived): without a release it would never start a task again.
    m = Migration(A)
    m.adopt(B, 0.0)
    assert m.receive(current(m, "old", True, 0, 0, 0), 0.1) == [Retired("old")]
    assert m.phase is MigrationPhase.STEADY
    assert m.adopt(A, 1.0) == [ReleaseServer("old"), HoldServer("new")]
    assert m.releasing == {"old"}
    assert "old" not in m.retired


def test_an_old_answer_to_a_hold_does_not_retire_a_server_removed_again() -> None:
    """The overtaking sequence: "old" is removed (held), answers "held, holds nothing",
    but that answer is slow; meanwhile "old" comes back (released), takes work, and is
    removed again (held anew). The slow answer must not pass for the new hold's: it
    answers an older request, so it is stale, and "old" retires only once the answer to
    the latest hold says it holds nothing."""
    m = Migration(A)
    [first_hold] = m.adopt(B, 0.0)
    assert isinstance(first_hold, HoldServer)
    assert first_hold.server == "old"
    slow = ServerReport("old", True, 0, 0, 0, answers=first_hold.seq)
    back = m.adopt(A, 1.0)
    assert back[0] == ReleaseServer("old")
    release = back[0]
    assert isinstance(release, ReleaseServer)
    assert release.seq > first_hold.seq
    # Released, "old" takes 2 tasks; its answer to the release is slow too.
    released = ServerReport("old", False, 2, 0, 0, answers=release.seq)
    again = m.adopt(B, 2.0)
    assert again == [ReleaseServer("new"), HoldServer("old")]
    second_hold = again[1]
    assert isinstance(second_hold, HoldServer)
    assert second_hold.seq > release.seq
    assert m.latest_request("old") == second_hold.seq
    for stale in (slow, released):
        with pytest.raises(StaleMessage):
            m.receive(stale, 2.1)
    assert m.retiring == {"old"}
    assert m.retired == frozenset()
    # The answer to the latest hold counts: 2 queued, to be moved first.
    moves = m.receive(ServerReport("old", True, 2, 0, 0, answers=second_hold.seq), 2.2)
    assert moves
    assert all(isinstance(x, MoveQueued) and x.source == "old" for x in moves)
    assert m.retiring == {"old"}


def test_request_numbers_survive_a_restart_and_older_state_still_loads() -> None:
    m = Migration(A)
    m.adopt(B, 0.0)
    m.adopt(A, 1.0)  # "old" released, "new" held
    saved = m.to_json_data()
    back = Migration.from_json_data(saved)
    assert back.to_json_data() == saved
    assert back.latest_request("old") == m.latest_request("old") > 0
    # Re-sent as polls, its requests keep their numbers (their answers still count)...
    drains = (HoldServer, RequeueRunning, ReleaseServer)
    resent = {x.server: x.seq for x in back.handle_timer(5.0) if isinstance(x, drains)}
    assert resent == {"old": m.latest_request("old"), "new": m.latest_request("new")}
    assert back.handle_timer(6.0) == m.handle_timer(6.0)
    # ...and a change numbers on from where it stopped: no number is reused.
    again = [x for x in back.adopt(B, 7.0) if isinstance(x, drains)]
    assert again
    assert min(x.seq for x in again) > saved["seq"]
    # State saved before requests were numbered still loads; numbering starts over.
    old = Migration.from_json_data({k: v for k, v in saved.items() if k not in ("seq", "asked")})
    assert old.retiring == {"new"}
    assert old.latest_request("new") == 0
    with pytest.raises(LocalProtocolError, match="damaged"):
        Migration.from_json_data({**saved, "seq": 0})  # a number above the last one


def test_numbers_keep_growing_when_a_balancer_starts_over_without_its_state() -> None:
    """New request numbers are at least the wall clock in microseconds: a balancer whose
    saved state is lost numbers above what the servers applied from its predecessor."""
    m = Migration(A)
    [hold] = m.adopt(B, 1_000.0)
    assert isinstance(hold, HoldServer)
    assert hold.seq >= 1_000 * 1_000_000
    fresh = Migration(A)
    [later] = fresh.adopt(B, 1_001.0)
    assert isinstance(later, HoldServer)
    assert later.seq > hold.seq


def test_a_server_applies_no_request_numbered_below_one_it_applied() -> None:
    """The server's side: an old hold overtaken by its release (or an old release by a
    newer hold) is answered but changes nothing; unnumbered requests always apply."""
    held = HoldState().after(True, 7)
    assert held == HoldState(True, 7)
    assert not held.applies(5)
    assert held.after(False, 5) == held  # a release older than the hold
    assert held.after(True, 7) == held  # the same request again (a poll)
    assert held.after(False, 8) == HoldState(False, 8)
    assert held.after(False, 0) == HoldState(False, 7)  # an unnumbered one (older balancer)


def test_a_move_that_moved_nothing_releases_its_target_and_waits_for_the_probe() -> None:
    """Found by the stateful test of the balancer machine: a target held by a hold that
    outlived its release refuses every move, and re-probing the source at once planned
    the same move again, in a loop of transfers at one instant. Now the target is asked
    to release (idempotent) and the source is probed at its next probe only."""
    m = Migration(A)
    m.adopt(B, 0.0)  # "old" retiring
    moves = m.receive(current(m, "old", True, 1, 0, 0), 0.1)
    assert moves == [MoveQueued("old", "new", 1)]
    out = m.receive(TransferDone("old", "new", 0), 0.2)
    assert out == [ReleaseServer("new")]  # no probe of "old" at once
    assert m.releasing == {"new"}
    assert m.handle_timer(0.3) == []
    # Its release answered (not held), the next probe of "old" plans the move again.
    assert m.receive(current(m, "new", False, 0, 0, 0), 0.4) == []
    probe = m.handle_timer(1.2)
    assert [type(x) for x in probe] == [HoldServer]
    assert m.receive(current(m, "old", True, 1, 0, 0), 1.3) == [MoveQueued("old", "new", 1)]
    # A move that moved something probes its source at once, as before.
    assert m.receive(TransferDone("old", "new", 1), 1.4) == [HoldServer("old")]
