"""The transfer coordinator against real task ledgers, under any delivery order and crash.

`TestTransfers` (hypothesis, stateful) starts transfers and at every step delivers, drops,
duplicates or holds back (so reorders) any frame in flight, crashes and restarts any server
(its ledger reloaded from what it persisted), restarts the coordinator, runs and finishes
tasks and advances the clock. After every step each task id is in exactly one place and
every reservation is one the coordinator drives or is about to learn of; at quiescence
nothing is reserved, every transfer is DONE and its caller got one answer.

The same checks run over seeded random walks against deliberately broken coordinators
(`MUTANTS`): each must be caught.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from treewave.core.errors import LocalProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.messages import (
    Task,
    TransferCommit,
    TransferOutcome,
    TransferPrepared,
    TransferReservations,
    TransferSettled,
)
from treewave.core.transfer import (
    TransferCoordinator,
    TransferDone,
    TransferOutput,
    TransferPhase,
    TransferResult,
    TransferSend,
    _Transfer,
)
from treewave.core.transfersim import TransferNetwork

NAMES = ("a", "b", "c")


def tasks_for(counts: dict[str, int]) -> dict[str, list[Task]]:
    return {n: [Task(id=f"{n}.{i}", duration_s=1.0) for i in range(k)] for n, k in counts.items()}


# --- the checks --------------------------------------------------------------------------------


def check_conservation(net: TransferNetwork, all_ids: set[str]) -> None:
    places = net.places()
    twice = {tid: where for tid, where in places.items() if len(where) > 1}
    assert not twice, f"tasks in two places: {twice}"
    missing = all_ids - places.keys()
    assert not missing, f"tasks lost: {sorted(missing)}"
    assert places.keys() <= all_ids, "tasks appeared from nowhere"
    assert not net.unresolvable(), f"reservations nobody resolves: {net.unresolvable()}"
    assert all(n == 1 for n in net.done.values()), f"a transfer finished twice: {net.done}"


def check_quiescent(net: TransferNetwork, all_ids: set[str]) -> None:
    net.quiesce()
    check_conservation(net, all_ids)
    for name, p in net.servers.items():
        assert not p.ledger.reserved, f"{name} still holds {list(p.ledger.reserved)}"
    assert not net.coordinator.active
    for generation, tid in net.started:
        if generation == net.generation:
            assert net.coordinator.phase(tid) is TransferPhase.DONE
            assert tid in net.results, f"{tid} never answered its caller"
    for result in net.results.values():
        if result.outcome == "committed":
            assert result.moved > 0
        if result.outcome in ("aborted", "empty"):
            assert result.moved == 0


# --- the stateful test -------------------------------------------------------------------------


class TransferMachine(RuleBasedStateMachine):
    net: TransferNetwork
    all_ids: set[str]

    @initialize(counts=st.lists(st.integers(0, 6), min_size=3, max_size=3))
    def setup(self, counts: list[int]) -> None:
        self.net = TransferNetwork(tasks_for(dict(zip(NAMES, counts, strict=True))))
        self.all_ids = set(self.net.places())

    @rule(
        pair=st.permutations(NAMES).map(lambda p: (p[0], p[1])),
        count=st.integers(1, 4),
    )
    def start(self, pair: tuple[str, str], count: int) -> None:
        self.net.start(pair[0], pair[1], count)

    @rule(i=st.integers(0, 1000))
    def deliver(self, i: int) -> None:
        if self.net.in_flight:
            self.net.deliver(i % len(self.net.in_flight))

    @rule(i=st.integers(0, 1000))
    def deliver_newest(self, i: int) -> None:
        """Deliver from the end of the pool: later frames overtake earlier ones."""
        if self.net.in_flight:
            self.net.deliver(len(self.net.in_flight) - 1 - i % len(self.net.in_flight))

    @rule(i=st.integers(0, 1000))
    def drop(self, i: int) -> None:
        if self.net.in_flight:
            self.net.drop(i % len(self.net.in_flight))

    @rule(i=st.integers(0, 1000))
    def duplicate(self, i: int) -> None:
        if self.net.in_flight:
            self.net.duplicate(i % len(self.net.in_flight))

    @rule(name=st.sampled_from(NAMES))
    def crash_or_restart(self, name: str) -> None:
        if self.net.servers[name].up:
            self.net.crash(name)
        else:
            self.net.restart(name)

    @rule()
    def restart_coordinator(self) -> None:
        self.net.restart_coordinator()

    @rule(name=st.sampled_from(NAMES), held=st.booleans())
    def hold_or_release(self, name: str, held: bool) -> None:
        """A server leaving the topology refuses deliveries; the drain may release it."""
        self.net.hold(name, held)

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.net.advance(dt)

    @rule(name=st.sampled_from(NAMES), finish=st.booleans())
    def work(self, name: str, finish: bool) -> None:
        if finish:
            self.net.finish_task(name)
        else:
            self.net.start_task(name)

    @invariant()
    def conserved(self) -> None:
        if hasattr(self, "net"):
            check_conservation(self.net, self.all_ids)

    def teardown(self) -> None:
        if hasattr(self, "net"):
            check_quiescent(self.net, self.all_ids)


TransferMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None
)
TestTransfers = TransferMachine.TestCase


# --- seeded random walks, for the real coordinator and for mutants -------------------------


def random_walk(net: TransferNetwork, rng: random.Random, steps: int, all_ids: set[str]) -> None:
    for _ in range(steps):
        roll = rng.random()
        pool = net.in_flight
        if roll < 0.12:
            source, target = rng.sample(NAMES, 2)
            net.start(source, target, rng.randint(1, 4))
        elif roll < 0.55 and pool:
            net.deliver(rng.randrange(len(pool)))
        elif roll < 0.62 and pool:
            net.drop(rng.randrange(len(pool)))
        elif roll < 0.68 and pool:
            net.duplicate(rng.randrange(len(pool)))
        elif roll < 0.74:
            name = rng.choice(NAMES)
            if net.servers[name].up:
                net.crash(name)
            else:
                net.restart(name)
        elif roll < 0.76:
            net.restart_coordinator()
        elif roll < 0.88:
            net.advance(rng.choice([0.5, 1.0, 2.5]))
        elif roll < 0.97:
            name = rng.choice(NAMES)
            net.start_task(name) if rng.random() < 0.5 else net.finish_task(name)
        else:
            net.hold(rng.choice(NAMES), rng.random() < 0.5)
        check_conservation(net, all_ids)
    check_quiescent(net, all_ids)


def walk(factory: Callable[..., TransferCoordinator], seed: int) -> None:
    rng = random.Random(seed)
    net = TransferNetwork(tasks_for({n: rng.randint(0, 6) for n in NAMES}), factory=factory)
    random_walk(net, rng, 80, set(net.places()))


def test_random_walks_keep_every_task_in_one_place() -> None:
    for seed in range(1000):
        walk(TransferCoordinator, seed)


class CommitBeforeConfirmed(TransferCoordinator):
    """Tells the donor to commit as soon as it reserved, before the recipient answers."""

    def _prepared(self, t: _Transfer, msg: TransferPrepared, now: float) -> list[TransferOutput]:
        out = super()._prepared(t, msg, now)
        if msg.tasks:
            out.append(TransferSend(t.source, TransferCommit(transfer=t.tid)))
        return out


class AbortAfterAccepted(TransferCoordinator):
    """Aborts whatever the recipient answered."""

    def _verdict(self, t: _Transfer, msg: TransferOutcome, now: float) -> list[TransferOutput]:
        out = super()._verdict(t, msg, now)
        t.accepted = False
        t.phase = TransferPhase.ABORTING
        return [o for o in out if not isinstance(o, TransferSend)] + self._ask(t, now)


class AbortOnDeliverTimeout(TransferCoordinator):
    """Takes an unanswered deliver for a refusal instead of asking the recipient."""

    def _timed_out(self, t: _Transfer, now: float) -> list[TransferOutput]:
        if t.phase is TransferPhase.DELIVERING:
            t.accepted = False
            t.phase = TransferPhase.ABORTING
            return self._ask(t, now)
        return super()._timed_out(t, now)


class ForgetsInDoubtOnRestart(TransferCoordinator):
    """Never asks a (re)connected server for its reservations."""

    def link_up(self, server: str, now: float) -> list[TransferOutput]:
        return [o for o in super().link_up(server, now) if not isinstance(o, TransferSend)]


class TrustsReservations(TransferCoordinator):
    """Aborts a reservation learnt from the query without asking the recipient."""

    def _recover(self, msg: TransferReservations, now: float, donor: str) -> list[TransferOutput]:
        out: list[TransferOutput] = []
        for r in msg.reservations:
            if r.transfer in self._active or r.transfer in self._done:
                continue
            phase = TransferPhase.ABORTING
            t = _Transfer(r.transfer, donor, r.target, r.tasks, phase, reserved=r.tasks)
            t.reported = True
            self._active[t.tid] = t
            out += self._ask(t, now)
        return out


class GivesUpAfterOneRetry(TransferCoordinator):
    """Drops a transfer whose settle step went unanswered (no retries)."""

    def _timed_out(self, t: _Transfer, now: float) -> list[TransferOutput]:
        if t.phase in (TransferPhase.COMMITTING, TransferPhase.ABORTING):
            del self._active[t.tid]
            self._done[t.tid] = None
            return []
        return super()._timed_out(t, now)


MUTANTS = [
    CommitBeforeConfirmed,
    AbortAfterAccepted,
    AbortOnDeliverTimeout,
    ForgetsInDoubtOnRestart,
    TrustsReservations,
    GivesUpAfterOneRetry,
]


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.__name__)
def test_broken_coordinators_are_caught(mutant: type[TransferCoordinator]) -> None:
    for seed in range(400):
        try:
            walk(mutant, seed)
        except AssertionError:
            return
    pytest.fail(f"{mutant.__name__} passed 400 random walks")


# --- plain tests -------------------------------------------------------------------------------


def happy(net: TransferNetwork) -> None:
    while net.in_flight:
        net.deliver(0)


def test_a_transfer_moves_tasks_through_every_phase() -> None:
    net = TransferNetwork(tasks_for({"a": 3, "b": 0}))
    tid = net.start("a", "b", 2)
    c = net.coordinator
    assert c.phase(tid) is TransferPhase.PREPARING
    net.deliver(0)  # prepare
    net.deliver(0)  # prepared
    assert c.phase(tid) is TransferPhase.DELIVERING
    net.deliver(0)  # deliver
    net.deliver(0)  # outcome
    assert c.phase(tid) is TransferPhase.COMMITTING
    happy(net)
    assert c.phase(tid) is TransferPhase.DONE
    assert net.results[tid] == TransferResult(tid, 2, "committed")
    assert net.done[tid] == 1
    assert net.servers["b"].ledger.task_ids()["queued"] == ["a.1", "a.2"]
    assert net.servers["a"].ledger.task_ids()["queued"] == ["a.0"]


def test_a_held_recipient_refuses_the_delivery_and_the_donor_keeps_its_tasks() -> None:
    net = TransferNetwork(tasks_for({"a": 3, "b": 0}))
    net.hold("b", True)
    net.crash("b")  # held is persisted: it survives a restart
    net.restart("b")
    tid = net.start("a", "b", 2)
    happy(net)
    assert net.results[tid].moved == 0
    assert net.servers["b"].ledger.task_ids()["queued"] == []
    assert sorted(net.servers["a"].ledger.task_ids()["queued"]) == ["a.0", "a.1", "a.2"]
    assert not net.servers["a"].ledger.reserved
    net.hold("b", False)  # released: it takes work again
    tid = net.start("a", "b", 2)
    happy(net)
    assert net.results[tid].moved == 2
    assert len(net.servers["b"].ledger.task_ids()["queued"]) == 2


def test_nothing_to_move_is_empty() -> None:
    net = TransferNetwork(tasks_for({"a": 0, "b": 0}))
    tid = net.start("a", "b", 2)
    happy(net)
    assert net.results[tid] == TransferResult(tid, 0, "empty")


def test_a_lost_deliver_is_resolved_through_the_recipient() -> None:
    net = TransferNetwork(tasks_for({"a": 2, "b": 0}))
    tid = net.start("a", "b", 2)
    net.deliver(0)
    net.deliver(0)
    net.in_flight.pop()  # the deliver never arrives (no link_up: a silent loss)
    net.advance(2.0)
    assert net.coordinator.phase(tid) is TransferPhase.IN_DOUBT
    happy(net)
    assert net.results[tid] == TransferResult(tid, 0, "aborted")
    assert net.servers["a"].ledger.task_ids()["queued"] == ["a.0", "a.1"]
    assert net.servers["b"].ledger.verdict(tid) == "cancelled"


def test_a_lost_outcome_still_commits() -> None:
    net = TransferNetwork(tasks_for({"a": 2, "b": 0}))
    tid = net.start("a", "b", 1)
    for _ in range(3):
        net.deliver(0)
    net.in_flight.pop()  # the recipient accepted, but its answer is lost
    net.advance(2.0)
    happy(net)
    assert net.results[tid] == TransferResult(tid, 1, "committed")


def test_a_fresh_coordinator_resolves_what_the_old_one_left() -> None:
    net = TransferNetwork(tasks_for({"a": 2, "b": 0}))
    tid = net.start("a", "b", 2)
    net.deliver(0)  # the donor reserves
    net.restart_coordinator()  # the prepared reply is lost with the old balancer
    assert tid not in net.coordinator.active
    net.deliver(0)  # the query to the donor (a is dialled first)
    net.deliver(0)  # ... then to b
    net.deliver(0)  # a's answer: it holds a reservation for `tid`
    assert tid in net.coordinator.active
    assert net.coordinator.phase(tid) is TransferPhase.IN_DOUBT
    happy(net)
    assert net.coordinator.phase(tid) is TransferPhase.DONE
    assert not net.servers["a"].ledger.reserved
    assert net.done[tid] == 1
    assert tid not in net.results  # its caller went with the old balancer


def test_a_late_prepare_after_settling_reserves_nothing() -> None:
    net = TransferNetwork(tasks_for({"a": 2, "b": 0}))
    tid = net.start("a", "b", 1)
    net.duplicate(0)
    late = net.in_flight.pop(0)
    happy(net)
    assert net.coordinator.phase(tid) is TransferPhase.DONE
    net.in_flight.append(late)
    net.deliver(0)
    assert not net.servers["a"].ledger.reserved


def test_an_empty_answer_is_final_even_if_the_prepare_comes_again() -> None:
    net = TransferNetwork(tasks_for({"a": 0, "b": 0}))
    tid = net.start("a", "b", 1)
    net.duplicate(0)
    late = net.in_flight.pop(0)
    happy(net)
    assert net.results[tid] == TransferResult(tid, 0, "empty")
    net.servers["a"].ledger.submit(tasks_for({"a": 1})["a"])
    net.in_flight.append(late)
    net.deliver(0)
    assert not net.servers["a"].ledger.reserved


def test_a_task_may_come_back_to_its_donor_before_the_commit() -> None:
    net = TransferNetwork(tasks_for({"a": 1, "b": 0}))
    there = net.start("a", "b", 1)
    for _ in range(4):
        net.deliver(0)  # prepare, prepared, deliver, outcome: b has a.0
    commit = net.in_flight.pop(0)  # the commit to a is held up
    back = net.start("b", "a", 1)
    happy(net)
    assert net.results[back] == TransferResult(back, 1, "committed")
    net.in_flight.append(commit)
    happy(net)
    assert net.results[there] == TransferResult(there, 1, "committed")
    assert net.servers["a"].ledger.task_ids()["queued"] == ["a.0"]
    assert not net.servers["b"].ledger.task_ids()["queued"]


def test_an_unreachable_participant_times_the_step_out_at_once() -> None:
    c = TransferCoordinator(NAMES, "x", step_timeout_s=5.0)
    tid, out = c.start("a", "b", 1, 0.0)
    assert out == [TransferSend("a", out[0].message)]  # type: ignore[union-attr]
    out = c.unreachable("a", 0.1)
    assert TransferResult(tid, 0, "in_doubt") in out
    assert c.phase(tid) is TransferPhase.IN_DOUBT
    out = c.unreachable("b", 0.1)
    assert out == []  # retried later, not now
    assert c.phase(tid) is TransferPhase.IN_DOUBT
    assert c.handle_timer(0.5) == []
    retry = c.handle_timer(1.2)
    assert [type(o) for o in retry] == [TransferSend]


def test_bad_calls_and_replies_change_nothing() -> None:
    c = TransferCoordinator(NAMES, "x")
    for args in (("a", "a", 1), ("a", "zz", 1), ("a", "b", 0)):
        with pytest.raises(LocalProtocolError):
            c.start(*args, now=0.0)
    with pytest.raises(LocalProtocolError):
        c.phase("nope")
    tid, _ = c.start("a", "b", 1, 0.0)
    task = Task(id="t", duration_s=1.0)
    with pytest.raises(RemoteProtocolError, match="expected 'a'"):
        c.receive(TransferPrepared(transfer=tid, tasks=(task,)), 0.0, "c")
    with pytest.raises(RemoteProtocolError, match="at most 1"):
        c.receive(TransferPrepared(transfer=tid, tasks=(task, task)), 0.0, "a")
    with pytest.raises(StaleMessage):
        c.receive(TransferSettled(transfer=tid, outcome="committed"), 0.0, "a")
    with pytest.raises(StaleMessage):
        c.receive(TransferOutcome(transfer="other", outcome="accepted"), 0.0, "b")
    assert c.phase(tid) is TransferPhase.PREPARING
    out = c.receive(TransferPrepared(transfer=tid, tasks=(task,)), 0.0, "a")
    out = c.receive(TransferOutcome(transfer=tid, outcome="accepted"), 0.0, "b")
    with pytest.raises(RemoteProtocolError, match="answered aborted"):
        c.receive(TransferSettled(transfer=tid, outcome="aborted"), 0.0, "a")
    out = c.receive(TransferSettled(transfer=tid, outcome="committed"), 0.0, "a")
    assert TransferDone(tid, "committed", 1) in out


def test_a_server_is_involved_until_every_server_has_told_its_reservations() -> None:
    # After a restart the coordinator does not know which reservations the servers hold;
    # any may name a retiring server as recipient, so none may retire before all answered.
    c = TransferCoordinator(["a", "b", "gone"], "c1")
    assert c.involving("b") == 1
    assert c.reservations_unknown == {"a", "b", "gone"}
    c.receive(TransferReservations(reservations=()), 0.0, "a")
    c.receive(TransferReservations(reservations=()), 0.0, "b")
    assert c.involving("b") == 1  # "gone" has not answered
    c.set_servers(["a", "b"])  # it retired: nobody waits for it any more
    assert c.reservations_unknown == frozenset()
    assert c.involving("b") == 0
