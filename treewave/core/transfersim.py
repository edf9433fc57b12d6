"""An in-memory network that runs the real transfer coordinator against real task ledgers.

Like `simulation.SimNetwork` for the waves: every message sent goes into one in-flight
pool and a test picks what happens to each (deliver, drop, duplicate; any order, so any
delay). Participants answer through `TaskLedger.answer` and persist where the node does
(after every coordinator request, before replying; not after starting or finishing a task),
so a crash reloads the ledger from its last snapshot. The model of links:

- a dropped frame means its link broke: the balancer redials and calls `link_up`;
- a crashed server loses the frames on their way to it; it redials on restart;
- a restarted coordinator loses every frame on its links (they all broke) and redials
  every server that is up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from treewave.core.errors import StaleMessage
from treewave.core.ledger import (
    TRANSFER_REPLIES,
    TRANSFER_REQUESTS,
    TaskLedger,
    TransferReply,
    TransferRequest,
)
from treewave.core.messages import Task, TransferQuery, TransferReservations
from treewave.core.transfer import (
    TransferCoordinator,
    TransferDone,
    TransferOutput,
    TransferResult,
    TransferSend,
)

__all__ = ["COORDINATOR", "SimParticipant", "TransferNetwork", "task_places"]

COORDINATOR = "balancer"

CoordinatorFactory = Callable[[Iterable[str], str, float, float], TransferCoordinator]


@dataclass
class SimParticipant:
    name: str
    ledger: TaskLedger
    persisted: dict[str, Any]
    up: bool = True
    held: bool = False
    """Leaving the topology: deliveries are refused (`TaskLedger.answer`). Persisted with
    the ledger, as the node does."""

    def persist(self) -> None:
        self.persisted = {**self.ledger.to_json_data(), "held": self.held}

    def reload(self) -> None:
        self.ledger = TaskLedger.from_json_data(self.persisted)
        self.held = bool(self.persisted.get("held", False))


@dataclass
class Flight:
    sender: str
    to: str
    message: TransferRequest | TransferReply
    generation: int
    """The coordinator generation whose link carries it."""


@dataclass
class TransferNetwork:
    """Servers holding `tasks`, a coordinator, and the frames between them."""

    tasks: dict[str, list[Task]]
    step_timeout_s: float = 2.0
    retry_s: float = 1.0
    factory: CoordinatorFactory = TransferCoordinator
    now: float = 0.0
    servers: dict[str, SimParticipant] = field(init=False)
    coordinator: TransferCoordinator = field(init=False)
    generation: int = 0
    in_flight: list[Flight] = field(default_factory=list)
    results: dict[str, TransferResult] = field(default_factory=dict)
    done: Counter[str] = field(default_factory=Counter)
    started: list[tuple[int, str]] = field(default_factory=list)
    """(coordinator generation, transfer id) of every started transfer."""
    stale: int = 0

    def __post_init__(self) -> None:
        self.servers = {}
        for name, tasks in self.tasks.items():
            ledger = TaskLedger()
            ledger.submit(tasks)
            self.servers[name] = SimParticipant(name, ledger, {})
            self.servers[name].persist()
        self.coordinator = self._new_coordinator()
        # The deployment is new: every server has answered that it holds no reservation
        # (as its first link up would have it asked).
        for name in self.servers:
            self.coordinator.receive(TransferReservations(reservations=()), self.now, name)

    def _new_coordinator(self) -> TransferCoordinator:
        return self.factory(self.servers, f"c{self.generation}", self.step_timeout_s, self.retry_s)

    # --- actions ---------------------------------------------------------------------------

    def start(self, source: str, target: str, count: int) -> str:
        tid, out = self.coordinator.start(source, target, count, self.now)
        self.started.append((self.generation, tid))
        self._apply(out)
        return tid

    def deliver(self, index: int) -> None:
        flight = self.in_flight.pop(index)
        self._deliver(flight)

    def duplicate(self, index: int) -> None:
        """Deliver a copy, keeping the original in flight."""
        self._deliver(self.in_flight[index])

    def drop(self, index: int) -> None:
        """The frame is lost with its link; the balancer redials that server."""
        flight = self.in_flight.pop(index)
        server = flight.to if flight.sender == COORDINATOR else flight.sender
        if self.servers[server].up:
            self._apply(self.coordinator.link_up(server, self.now))

    def crash(self, name: str) -> None:
        """The server dies: what it did not persist is gone; frames to it are lost."""
        p = self.servers[name]
        p.up = False
        p.reload()
        self.in_flight = [f for f in self.in_flight if f.to != name]

    def restart(self, name: str) -> None:
        p = self.servers[name]
        p.reload()
        p.up = True
        self._apply(self.coordinator.link_up(name, self.now))

    def restart_coordinator(self) -> None:
        """A fresh coordinator (the balancer restarted); it knows nothing of the old
        transfers and redials every server that is up."""
        self.generation += 1
        self.in_flight = []
        self.coordinator = self._new_coordinator()
        for name, p in self.servers.items():
            if p.up:
                self._apply(self.coordinator.link_up(name, self.now))

    def hold(self, name: str, held: bool) -> None:
        """Hold (or release) a server that is up, as a drain request does (persisted)."""
        p = self.servers[name]
        if p.up:
            p.held = held
            p.persist()

    def advance(self, dt: float) -> None:
        self.now += dt
        self._apply(self.coordinator.handle_timer(self.now))

    def start_task(self, name: str) -> None:
        p = self.servers[name]
        if p.up:
            p.ledger.start_next()

    def finish_task(self, name: str) -> None:
        p = self.servers[name]
        if p.up and p.ledger.running:
            p.ledger.finish(next(iter(p.ledger.running)))

    # --- plumbing --------------------------------------------------------------------------

    def _deliver(self, flight: Flight) -> None:
        msg = flight.message
        if flight.to == COORDINATOR:
            assert isinstance(msg, TRANSFER_REPLIES)
            try:
                out = self.coordinator.receive(msg, self.now, flight.sender)
            except StaleMessage:
                self.stale += 1
                return
            self._apply(out)
            return
        p = self.servers[flight.to]
        if not p.up:
            return
        assert isinstance(msg, TRANSFER_REQUESTS)
        reply = p.ledger.answer(msg, self.now, held=p.held)
        if not isinstance(msg, TransferQuery):
            p.persist()
        self.in_flight.append(Flight(flight.to, COORDINATOR, reply, self.generation))

    def _apply(self, outputs: list[TransferOutput]) -> None:
        work = list(outputs)
        while work:
            item = work.pop(0)
            if isinstance(item, TransferSend):
                if self.servers[item.to].up:
                    self.in_flight.append(
                        Flight(COORDINATOR, item.to, item.message, self.generation)
                    )
                else:
                    work += self.coordinator.unreachable(item.to, self.now)
            elif isinstance(item, TransferResult):
                assert item.transfer not in self.results, f"two results for {item.transfer}"
                self.results[item.transfer] = item
            elif isinstance(item, TransferDone):
                self.done[item.transfer] += 1

    # --- views -----------------------------------------------------------------------------

    def places(self) -> dict[str, list[str]]:
        """Where each task id is (see `task_places`)."""
        return task_places({name: p.ledger for name, p in self.servers.items()})

    def unresolvable(self) -> list[str]:
        """Reservations at an up server that no one will resolve: the coordinator does
        not drive them and no reservation query (or its answer) from that server is on
        its way."""
        lost = []
        for name, p in self.servers.items():
            if not p.up:
                continue  # it is queried when it comes back
            for tid in p.ledger.reserved:
                if tid in self.coordinator.active:
                    continue
                if any(self._asks_about(f, name, tid) for f in self.in_flight):
                    continue
                lost.append(f"{name}:{tid}")
        return lost

    @staticmethod
    def _asks_about(f: Flight, name: str, tid: str) -> bool:
        if isinstance(f.message, TransferQuery):
            return f.to == name
        if isinstance(f.message, TransferReservations) and f.sender == name:
            return any(r.transfer == tid for r in f.message.reservations)
        return False

    def quiesce(self, max_rounds: int = 1000) -> None:
        """Bring every server up and deliver everything, advancing time past timeouts and
        retries, until nothing is in flight and the coordinator drives nothing."""
        for name, p in self.servers.items():
            if not p.up:
                self.restart(name)
        for _ in range(max_rounds):
            while self.in_flight:
                self.deliver(0)
            if not self.coordinator.active:
                return
            self.advance(max(self.step_timeout_s, self.retry_s))
        raise AssertionError(f"transfers never settled: {self.coordinator.active}")


def task_places(ledgers: Mapping[str, TaskLedger]) -> dict[str, list[str]]:
    """Where each task id is, over these servers' ledgers: queued, running, completed, or
    reserved at a donor for a transfer its recipient has not accepted (an accepted one's
    tasks are at the recipient; the reservation only waits for its commit). A task in
    exactly one place has a list of one."""
    out: dict[str, list[str]] = {}
    for name, ledger in ledgers.items():
        ids = ledger.task_ids()
        for where in ("queued", "running", "completed"):
            for tid in ids[where]:
                out.setdefault(tid, []).append(f"{name}:{where}")
        for r in ledger.reserved.values():
            target = ledgers.get(r.target)
            if target is not None and target.verdict(r.transfer) == "accepted":
                continue
            for task in r.tasks:
                out.setdefault(task.id, []).append(f"{name}:reserved:{r.transfer}")
    return out
