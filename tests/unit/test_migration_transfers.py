"""A topology change carried out by the real transfer coordinator, under any delivery order.

`test_migration.py` drives the migration machine with a simple synchronous executor;
here its moves go through the real two-phase `TransferCoordinator` against simulated
servers (`core.transfersim`: real `TaskLedger`s that persist where the node does), as in
the balancer. Hypothesis picks, at every step: a transfer frame to deliver, drop or
duplicate; a drain request or report to deliver; a queued move to start; a server crash
or restart; a balancer crash (the coordinator starts afresh and the migration comes back
from its JSON, everything in flight lost); a clock tick; a task starting or finishing;
fresh target loads; or a newer topology superseding the migration.

A server may be retired (its container stopped, its storage deleted) only when it holds
nothing and no transfer involving it is unsettled: checked when the machine says so, and
a retired server is never started again. Throughout, every task id is in exactly one place
(retired servers included), and at quiescence the machine is steady, every removed server
retired, nothing reserved, nothing held in the final topology.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.support.migration import drain_topology
from treewave.core.errors import LocalProtocolError, StaleMessage
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
from treewave.core.policy import Load
from treewave.core.topology import Topology
from treewave.core.transfersim import TransferNetwork

POOL = [f"s{i}" for i in range(7)]
PROBE_S = 1.0
STEP_S = 2.0
"""The coordinator's step timeout and retry interval."""

name_sets = st.lists(st.sampled_from(POOL), min_size=1, max_size=5, unique=True)
Drain = HoldServer | RequeueRunning | ReleaseServer


class MigrationOverTransfers(RuleBasedStateMachine):
    net: TransferNetwork

    @initialize(
        a=name_sets,
        b=name_sets,
        seed=st.integers(0, 1000),
        grace=st.sampled_from([0.0, 3.0]),
        queues=st.lists(st.integers(0, 8), min_size=len(POOL), max_size=len(POOL)),
        running=st.lists(st.integers(0, 2), min_size=len(POOL), max_size=len(POOL)),
        early=st.lists(
            st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(1, 3)), max_size=4
        ),
    )
    def setup(
        self,
        a: list[str],
        b: list[str],
        seed: int,
        grace: float,
        queues: list[int],
        running: list[int],
        early: list[tuple[int, int, int]],
    ) -> None:
        self.seed, self.grace = seed, grace
        topo_a = drain_topology(a, seed, grace)
        self.cpus = {s.name: s.cpus for s in topo_a.servers}
        tasks = {
            name: [Task(id=f"{name}:t{k}", duration_s=1.0) for k in range(q)] if name in a else []
            for name, q in zip(POOL, queues, strict=True)
        }
        self.net = TransferNetwork(tasks, step_timeout_s=STEP_S, retry_s=STEP_S)
        for name, n in zip(POOL, running, strict=True):
            for _ in range(min(n, self.cpus.get(name, 1))):
                self.net.start_task(name)
        self.all_ids = set(self.net.places())
        self.machine = Migration(topo_a, probe_interval_s=PROBE_S)
        # Periodic rebalancing's transfers, still in flight when the new topology comes:
        # the migration does not know them; only the coordinator's count protects them.
        for i, j, count in early:
            source, target = a[i % len(a)], a[j % len(a)]
            if source != target:
                self.net.start(source, target, count)
        self.drains: list[Drain] = []
        self.applied: Counter[str] = Counter()
        """Server -> the number of the latest drain request it applied."""
        """Drain requests on their way to servers."""
        self.reports: list[ServerReport] = []
        """Drain reports on their way to the balancer (`in_doubt` is added on arrival)."""
        self.moves: list[MoveQueued] = []
        """Moves the shell has not started yet (the balancer's `pending_moves`)."""
        self.pending: Counter[str] = Counter()
        self.started: dict[str, MoveQueued] = {}
        """Transfers started for moves by the current coordinator, not yet reported."""
        self.retired: set[str] = set()
        self.removed_ever: set[str] = set()
        self.superseded = False
        self.adopt(drain_topology(b, seed + 1, grace))

    # --- the balancer's shell ---------------------------------------------------------------

    def adopt(self, desired: Topology) -> None:
        self.cpus.update({s.name: s.cpus for s in desired.servers})
        self.removed_ever |= set(self.machine.topology.names) - set(desired.names)
        self.carry_out(self.machine.adopt(desired, self.net.now))

    def carry_out(self, intents: list[Intent]) -> None:
        for intent in intents:
            if isinstance(intent, MoveQueued):
                self.moves.append(intent)
                self.pending.update((intent.source, intent.target))
            elif isinstance(intent, Retired):
                self.retire(intent.server)
            else:
                self.drains.append(intent)

    def feed(self, outcome: Outcome) -> None:
        try:
            intents = self.machine.receive(outcome, self.net.now)
        except StaleMessage:
            return
        self.carry_out(intents)

    def collect_results(self) -> None:
        """Each finished transfer answers its move, once (as `_drain_move` does)."""
        for tid, move in list(self.started.items()):
            result = self.net.results.get(tid)
            if result is not None:
                del self.started[tid]
                event(f"a drain move ended {result.outcome}")
                self.feed(TransferDone(move.source, move.target, result.moved))

    def retire(self, name: str) -> None:
        if name in self.machine.topology or name in self.retired:
            return  # stale: a newer topology brought it back, or already done
        p = self.net.servers[name]
        assert name in self.removed_ever, f"{name} retired but never left a topology"
        assert self.net.coordinator.involving(name) == 0, f"{name} retired mid-transfer"
        for ids in (p.ledger.task_ids(), p.persisted):
            for where in ("queued", "running", "reserved"):
                assert not ids.get(where), f"{name} retired while holding {where}: {ids}"
        self.retired.add(name)
        event("a server retired")
        self.net.crash(name)  # stopped for good; its (empty) queue goes with it
        self.net.coordinator.set_servers(set(POOL) - self.retired)

    # --- rules: the shell's own traffic -----------------------------------------------------

    @precondition(lambda self: self.drains)
    @rule(data=st.data())
    def deliver_drain_request(self, data: st.DataObject) -> None:
        # Requests to one server travel in order on its link; across servers, any order.
        self.deliver_drain(data.draw(st.sampled_from(first_per_server(self.drains))))

    @precondition(lambda self: self.reports)
    @rule(data=st.data())
    def deliver_drain_report(self, data: st.DataObject) -> None:
        self.deliver_report(data.draw(st.sampled_from(first_per_server(self.reports))))

    @precondition(lambda self: self.moves)
    @rule(data=st.data())
    def start_a_move(self, data: st.DataObject) -> None:
        self.start_a_move_at(data.draw(st.integers(0, len(self.moves) - 1)))

    @rule(pair=st.permutations(POOL).map(lambda p: (p[0], p[1])), count=st.integers(1, 3))
    def rebalance(self, pair: tuple[str, str], count: int) -> None:
        """Periodic rebalancing moves tasks between servers of the adopted topology."""
        if all(n in self.machine.topology and n not in self.retired for n in pair):
            self.net.start(pair[0], pair[1], count)

    # --- rules: the transfer frames, the servers, the clock ---------------------------------

    @rule(i=st.integers(0, 1000), how=st.sampled_from(["deliver", "deliver", "drop", "dup"]))
    def transfer_frame(self, i: int, how: str) -> None:
        if not self.net.in_flight:
            return
        i %= len(self.net.in_flight)
        {"deliver": self.net.deliver, "drop": self.net.drop, "dup": self.net.duplicate}[how](i)
        self.collect_results()

    @rule(name=st.sampled_from(POOL))
    def crash_or_restart_a_server(self, name: str) -> None:
        if name in self.retired:
            return
        if self.net.servers[name].up:
            self.net.crash(name)
        else:
            self.net.restart(name)
        self.collect_results()

    @rule()
    def crash_the_balancer(self) -> None:
        """The coordinator starts afresh (it queries every server's reservations) and the
        migration resumes from its JSON; every frame, request and report in flight is lost,
        and the moves it had queued are forgotten (it plans them again)."""
        self.net.restart_coordinator()
        # A restarted balancer's coordinator knows the topology's and the retiring
        # servers, not the retired ones (`Cluster.linked_names`).
        self.net.coordinator.set_servers(set(POOL) - self.retired)
        self.machine = Migration.from_json_data(self.machine.to_json_data())
        self.drains.clear()
        self.reports.clear()
        self.moves.clear()
        self.pending.clear()
        self.started.clear()
        for name in self.machine.retired:
            self.retire(name)

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5]))
    def tick(self, dt: float) -> None:
        self.net.advance(dt)
        self.collect_results()
        self.carry_out(self.machine.handle_timer(self.net.now))

    @rule(name=st.sampled_from(POOL), finish=st.booleans())
    def work(self, name: str, finish: bool) -> None:
        p = self.net.servers[name]
        if finish:
            self.net.finish_task(name)
        elif not p.held and len(p.ledger.running) < self.cpus.get(name, 1):
            self.net.start_task(name)

    @rule()
    def target_loads(self) -> None:
        loads = tuple(
            Load(
                n,
                self.cpus[n],
                tuple(t.duration_s for t in led.running.values()),
                tuple(t.duration_s for t in led.queued),
            )
            for n in self.machine.topology.names
            if self.net.servers[n].up and (led := self.net.servers[n].ledger) is not None
        )
        self.feed(TargetLoads(loads))

    @precondition(lambda self: not self.superseded)
    @rule(c=name_sets)
    def supersede(self, c: list[str]) -> None:
        # A retired server's storage is gone: bringing its name back is a new server, a
        # case `test_migration.py` covers; here names come back only while still retiring.
        names = [n for n in c if n not in self.retired] or [
            n for n in POOL if n not in self.retired
        ][:1]
        if not names:
            return
        self.superseded = True
        self.adopt(drain_topology(names, self.seed + 2, self.grace))

    # --- checks -------------------------------------------------------------------------------

    @invariant()
    def every_task_in_exactly_one_place(self) -> None:
        if not hasattr(self, "net"):
            return
        places = self.net.places()
        twice = {t: w for t, w in places.items() if len(w) > 1}
        assert not twice, f"tasks in two places: {twice}"
        assert places.keys() == self.all_ids, (
            f"lost {sorted(self.all_ids - places.keys())}, "
            f"appeared {sorted(places.keys() - self.all_ids)}"
        )

    def teardown(self) -> None:
        if not hasattr(self, "net"):
            return
        for _ in range(300):
            for name, p in self.net.servers.items():
                if not p.up and name not in self.retired:
                    self.net.restart(name)
            for _ in range(10_000):
                if not (self.net.in_flight or self.drains or self.reports or self.moves):
                    break
                if self.net.in_flight:
                    self.net.deliver(0)
                    self.collect_results()
                elif self.moves:
                    self.start_a_move_at(0)
                elif self.drains:
                    self.deliver_drain(0)
                else:
                    self.deliver_report(0)
            else:
                raise AssertionError(f"frames never stop: {self.net.in_flight[:5]}")
            if (
                self.machine.phase is MigrationPhase.STEADY
                and not self.machine.releasing
                and not self.net.coordinator.active
            ):
                break
            self.net.advance(max(PROBE_S, STEP_S))
            self.collect_results()
            self.carry_out(self.machine.handle_timer(self.net.now))
        else:
            raise AssertionError(f"no quiescence: {self.machine.status(self.net.now)}")
        final = self.machine.topology
        for name, p in self.net.servers.items():
            if name in final:
                assert name not in self.retired, f"{name} is in the topology but retired"
                assert not p.held, f"{name} is in the topology but held"
            elif name in self.removed_ever:
                assert name in self.retired, f"{name} left the topology but never retired"
            assert not p.ledger.reserved, f"{name} keeps a reservation"
        self.every_task_in_exactly_one_place()

    def start_a_move_at(self, i: int) -> None:
        """The shell starts a queued move as a transfer (`Cluster._drain_move`); one it
        cannot start ends at once, having moved nothing."""
        move = self.moves.pop(i)
        self.pending.subtract((move.source, move.target))
        try:
            tid = self.net.start(move.source, move.target, move.count)
        except LocalProtocolError:
            self.feed(TransferDone(move.source, move.target, 0))
            return
        self.started[tid] = move
        self.collect_results()

    def deliver_drain(self, i: int) -> None:
        """A drain request reaches its server, which answers with a report (on disk
        first), as `Server._drain` does; a request to a server that is down is lost."""
        intent = self.drains.pop(i)
        p = self.net.servers[intent.server]
        if not p.up:
            return
        state = HoldState(p.held, self.applied[intent.server])
        applies = state.applies(intent.seq)
        requeued = (
            p.ledger.requeue_running() if applies and isinstance(intent, RequeueRunning) else 0
        )
        state = state.after(not isinstance(intent, ReleaseServer), intent.seq)
        self.applied[intent.server] = state.seq  # on disk with `held` (`Server._drain`)
        self.net.hold(intent.server, state.held)
        self.reports.append(
            ServerReport(
                server=intent.server,
                held=p.held,
                requeued=requeued,
                answers=intent.seq,
                **p.ledger.drain_counts(),
            )
        )

    def deliver_report(self, i: int) -> None:
        """A report reaches the balancer, which adds the transfers involving its server
        that are not settled (`Cluster.on_drain_report`)."""
        report = self.reports.pop(i)
        in_doubt = self.net.coordinator.involving(report.server) + self.pending[report.server]
        self.feed(dataclasses.replace(report, in_doubt=in_doubt))


def first_per_server(items: list[Drain] | list[ServerReport]) -> list[int]:
    """The index of the oldest item of each server: what its link delivers next."""
    firsts: dict[str, int] = {}
    for i, item in enumerate(items):
        firsts.setdefault(item.server, i)
    return sorted(firsts.values())


TestMigrationOverTransfers = MigrationOverTransfers.TestCase
TestMigrationOverTransfers.settings = settings(
    max_examples=1000,
    derandomize=False,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
