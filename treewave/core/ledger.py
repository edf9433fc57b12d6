"""A server's tasks and its side of two-phase transfers (pure, no I/O).

Every task is in exactly one place: queued, running, reserved for a transfer, or completed.
A transfer moves tasks only through `prepare` (queued -> reserved) and then `commit`
(dropped: the recipient has them) or `abort` (back to the queue). The recipient's side is
idempotent by transfer id: `deliver` twice enqueues once; `cancel` before `deliver` makes
a later `deliver` refuse, so the balancer can always find out which way a transfer went.
The donor's side remembers settled transfer ids, so a `prepare` that arrives late (after
the transfer was committed or aborted) reserves nothing: no reservation nobody resolves.
`answer` applies one coordinator request (`core.transfer`) and returns the reply.

A ledger made with `track_changes=True` also records what each operation changed
(`LedgerChanges`: which task ids it now holds or no longer holds, reservations made or
settled, the ids it remembers or forgot); `take_changes()` hands them over, so a store
can write each change in time proportional to it, not to the queue.
"""

from __future__ import annotations

import bisect
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from treewave.core.messages import (
    ReservationInfo,
    Task,
    TransferAbort,
    TransferCancel,
    TransferCommit,
    TransferDeliver,
    TransferOutcome,
    TransferPrepare,
    TransferPrepared,
    TransferQuery,
    TransferReservations,
    TransferSettled,
)

__all__ = [
    "QUEUE_ORDERS",
    "REMEMBERED_COMPLETIONS",
    "REMEMBERED_TRANSFERS",
    "TRANSFER_REPLIES",
    "TRANSFER_REQUESTS",
    "DrainCounts",
    "LedgerChanges",
    "QueueOrder",
    "Reservation",
    "TaskLedger",
    "TransferReply",
    "TransferRequest",
]

REMEMBERED_TRANSFERS = 10_000
REMEMBERED_COMPLETIONS = 200_000

TransferRequest = (
    TransferPrepare
    | TransferDeliver
    | TransferCancel
    | TransferCommit
    | TransferAbort
    | TransferQuery
)
"""What the transfer coordinator asks a participant."""
TRANSFER_REQUESTS = (
    TransferPrepare,
    TransferDeliver,
    TransferCancel,
    TransferCommit,
    TransferAbort,
    TransferQuery,
)
TransferReply = TransferPrepared | TransferOutcome | TransferSettled | TransferReservations
"""What a participant answers."""
TRANSFER_REPLIES = (TransferPrepared, TransferOutcome, TransferSettled, TransferReservations)
QueueOrder = Literal["longest-first", "fifo"]
QUEUE_ORDERS: tuple[QueueOrder, ...] = ("longest-first", "fifo")
"""How a server runs its queue. `longest-first` (the default): the longest expected task
next, so each server runs its share LPT-style and the balancer's plan is what happens;
tasks of equal duration still run in submission order. `fifo`: submission order."""


@dataclass(frozen=True, slots=True)
class Reservation:
    transfer: str
    target: str
    tasks: tuple[Task, ...]
    since: float


@dataclass(slots=True)
class LedgerChanges:
    """What changed in a ledger since the last `take_changes()`, as net effects (a task
    held and then given away within one batch shows up only as gone).

    `held`: task ids now queued or running here (running tasks are kept as held: after a
    crash they run again), with the task. `dropped`: task ids no longer held (reserved,
    completed). `reserved` / `unreserved`: reservations made / settled, by transfer id.
    `done`, `incoming`, `settled`: ids the ledger now remembers (completions, the
    recipient's verdicts, the donor's settled transfers); `forgotten_*`: ids it dropped
    from those bounded memories. The counters are read from the ledger itself."""

    held: dict[str, Task] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    reserved: dict[str, Reservation] = field(default_factory=dict)
    unreserved: set[str] = field(default_factory=set)
    done: list[str] = field(default_factory=list)
    forgotten_done: list[str] = field(default_factory=list)
    incoming: dict[str, Literal["accepted", "cancelled"]] = field(default_factory=dict)
    forgotten_incoming: list[str] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)
    forgotten_settled: list[str] = field(default_factory=list)

    def hold(self, task: Task) -> None:
        self.dropped.discard(task.id)
        self.held[task.id] = task

    def drop(self, task_id: str) -> None:
        if self.held.pop(task_id, None) is None:
            self.dropped.add(task_id)

    def empty(self) -> bool:
        return not (
            self.held
            or self.dropped
            or self.reserved
            or self.unreserved
            or self.done
            or self.forgotten_done
            or self.incoming
            or self.forgotten_incoming
            or self.settled
            or self.forgotten_settled
        )


class DrainCounts(TypedDict):
    """What a server answers a drain request with, besides whether it is held: what it
    still holds and its cumulative counters (`TaskLedger.drain_counts`)."""

    queued: int
    running: int
    reserved: int
    completed: int
    transferred_out: int


class TaskLedger:
    def __init__(self, order: QueueOrder = "longest-first", track_changes: bool = False) -> None:
        self.order = order
        self.track_changes = track_changes
        self._changes = LedgerChanges()
        self.queued: deque[Task] = deque()
        """In run order (the next task to start first)."""
        self.queue_version = 0
        """Bumped on every change to `queued`, so views of the queue can be cached."""
        self.queued_durations: Counter[float] = Counter()
        """How many queued tasks have each duration, kept as the queue changes: a view of
        the queue (the Echo reply's histogram) in O(distinct durations), not O(queue)."""
        self.running: dict[str, Task] = {}
        self.started_at: dict[str, float] = {}
        self.reserved: dict[str, Reservation] = {}
        self.completed = 0
        self.transferred_in = 0
        self.transferred_out = 0
        self._known_ids: set[str] = set()
        """Ids queued or running here. Not the reserved ones: an accepted transfer's tasks
        belong to its recipient, and may travel back here before the commit arrives."""
        self._done_ids: OrderedDict[str, None] = OrderedDict()
        self._incoming: OrderedDict[str, Literal["accepted", "cancelled"]] = OrderedDict()
        self._settled: OrderedDict[str, None] = OrderedDict()
        """Donor side: transfers committed or aborted here (a late prepare reserves nothing)."""

    def take_changes(self) -> LedgerChanges:
        """What changed since the last call (nothing unless `track_changes`)."""
        changes, self._changes = self._changes, LedgerChanges()
        return changes

    # --- local work ------------------------------------------------------------------------

    def submit(self, tasks: tuple[Task, ...] | list[Task]) -> int:
        """Queue new tasks; a task id already here (or already completed) is skipped."""
        added = 0
        for task in tasks:
            if task.id in self._known_ids or task.id in self._done_ids:
                continue
            self._known_ids.add(task.id)
            self._enqueue(task)
            if self.track_changes:
                self._changes.hold(task)
            added += 1
        return added

    def _enqueue(self, task: Task) -> None:
        """Into run order: behind every task of equal or longer duration (longest-first),
        or at the end (fifo)."""
        q = self.queued
        self.queue_version += 1
        self.queued_durations[task.duration_s] += 1
        if self.order == "fifo" or not q or q[-1].duration_s >= task.duration_s:
            q.append(task)
            return
        q.insert(bisect.bisect_right(q, -task.duration_s, key=_longest_first), task)

    def start_next(self, now: float = 0.0) -> Task | None:
        """Move the next queued task (in run order) to running, started at `now`."""
        if not self.queued:
            return None
        task = self.queued.popleft()
        self.queue_version += 1
        self._unqueued(task)
        self.running[task.id] = task
        self.started_at[task.id] = now
        return task

    def running_left(self, now: float) -> list[float]:
        """Expected seconds left of each running task (0 once past its declaration)."""
        return [
            max(0.0, t.duration_s - (now - self.started_at.get(i, now)))
            for i, t in self.running.items()
        ]

    def finish(self, task_id: str) -> bool:
        """Running -> completed; completion is counted once per task id."""
        self.started_at.pop(task_id, None)
        if self.running.pop(task_id, None) is None:
            return False
        self._known_ids.discard(task_id)
        if self.track_changes:
            self._changes.drop(task_id)
        if task_id in self._done_ids:
            return False
        self._done_ids[task_id] = None
        if self.track_changes:
            self._changes.done.append(task_id)
        while len(self._done_ids) > REMEMBERED_COMPLETIONS:
            forgotten, _ = self._done_ids.popitem(last=False)
            if self.track_changes:
                self._changes.forgotten_done.append(forgotten)
        self.completed += 1
        return True

    def requeue_running(self) -> int:
        """Running -> the front of the queue, to start again from scratch (as after a
        crash): how a server leaving the topology gives up its running tasks once its
        drain grace has passed. Returns how many."""
        tasks = list(self.running.values())
        self.running.clear()
        self.started_at.clear()
        for task in tasks:
            self._enqueue(task)
        return len(tasks)

    # --- donor side --------------------------------------------------------------------------

    def prepare(
        self,
        transfer: str,
        target: str,
        count: int,
        now: float,
        durations: tuple[float, ...] | None = None,
    ) -> Reservation:
        """Reserve up to `count` queued tasks, the last ones in run order (idempotent).
        With `durations`, reserve instead for each listed duration the queued task whose
        expected duration is closest to it, the last in run order among equals (so equal
        tasks left behind keep their submission order)."""
        if transfer in self.reserved:
            return self.reserved[transfer]
        if transfer in self._settled:
            return Reservation(transfer, target, (), now)
        self.queue_version += 1
        if durations is None:
            take = min(count, len(self.queued))
            tasks = tuple(self.queued.pop() for _ in range(take))[::-1]
        else:
            tasks = self._take_closest(durations)
        for task in tasks:
            self._unqueued(task)
        self._known_ids.difference_update(t.id for t in tasks)
        reservation = Reservation(transfer, target, tasks, now)
        if tasks:
            self.reserved[transfer] = reservation
            if self.track_changes:
                for task in tasks:
                    self._changes.drop(task.id)
                self._changes.reserved[transfer] = reservation
        else:
            # Answered "nothing": final, or a late copy of this prepare could reserve
            # tasks for a transfer the coordinator already finished as empty.
            self._settle(transfer)
        return reservation

    def _unqueued(self, task: Task) -> None:
        left = self.queued_durations[task.duration_s] - 1
        if left > 0:
            self.queued_durations[task.duration_s] = left
        else:
            del self.queued_durations[task.duration_s]

    def _take_closest(self, durations: tuple[float, ...]) -> tuple[Task, ...]:
        by_duration: dict[float, list[int]] = {}
        for i, t in enumerate(self.queued):
            by_duration.setdefault(t.duration_s, []).append(i)
        keys = sorted(by_duration)
        chosen: list[int] = []
        for want in durations:
            if not keys:
                break
            j = bisect.bisect_left(keys, want)
            near = keys[max(0, j - 1) : j + 1]
            key = min(near, key=lambda k: (abs(k - want), -k))
            chosen.append(by_duration[key].pop())
            if not by_duration[key]:
                del by_duration[key]
                keys.remove(key)
        picked = set(chosen)
        tasks = tuple(self.queued[i] for i in sorted(picked))
        self.queued = deque(t for i, t in enumerate(self.queued) if i not in picked)
        return tasks

    def commit(self, transfer: str) -> Literal["committed", "unknown"]:
        self._settle(transfer)
        reservation = self.reserved.pop(transfer, None)
        if reservation is None:
            return "unknown"
        self._unreserve(transfer)
        self.transferred_out += len(reservation.tasks)
        return "committed"

    def abort(self, transfer: str) -> Literal["aborted", "unknown"]:
        self._settle(transfer)
        reservation = self.reserved.pop(transfer, None)
        if reservation is None:
            return "unknown"
        self._unreserve(transfer)
        # The recipient refused them for good, so none can have come back meanwhile.
        for task in reservation.tasks:
            self._enqueue(task)
            if self.track_changes:
                self._changes.hold(task)
        self._known_ids.update(t.id for t in reservation.tasks)
        return "aborted"

    def _unreserve(self, transfer: str) -> None:
        if self.track_changes and self._changes.reserved.pop(transfer, None) is None:
            self._changes.unreserved.add(transfer)

    def _settle(self, transfer: str) -> None:
        new = transfer not in self._settled
        self._settled[transfer] = None
        if self.track_changes and new:
            self._changes.settled.append(transfer)
        while len(self._settled) > REMEMBERED_TRANSFERS:
            forgotten, _ = self._settled.popitem(last=False)
            if self.track_changes:
                self._changes.forgotten_settled.append(forgotten)

    # --- recipient side ----------------------------------------------------------------------

    def deliver(self, transfer: str, tasks: tuple[Task, ...]) -> Literal["accepted", "cancelled"]:
        known = self._incoming.get(transfer)
        if known is not None:
            return known
        self._remember(transfer, "accepted")
        self.transferred_in += self.submit(tasks)
        return "accepted"

    def cancel(self, transfer: str) -> Literal["accepted", "cancelled"]:
        known = self._incoming.get(transfer)
        if known is not None:
            return known
        self._remember(transfer, "cancelled")
        return "cancelled"

    def verdict(self, transfer: str) -> Literal["accepted", "cancelled"] | None:
        """The recipient's final answer for `transfer`, if it gave one."""
        return self._incoming.get(transfer)

    def _remember(self, transfer: str, outcome: Literal["accepted", "cancelled"]) -> None:
        self._incoming[transfer] = outcome
        if self.track_changes:
            self._changes.incoming[transfer] = outcome
        while len(self._incoming) > REMEMBERED_TRANSFERS:
            forgotten, _ = self._incoming.popitem(last=False)
            if self.track_changes:
                self._changes.forgotten_incoming.append(forgotten)

    # --- the coordinator's requests ------------------------------------------------------------

    def answer(self, msg: TransferRequest, now: float, *, held: bool = False) -> TransferReply:
        """Apply one request of the transfer coordinator and return the reply (the shell
        persists the ledger before sending it). A `held` server (leaving the topology)
        refuses new work: a delivery is answered as a cancel, pinned like one, so the donor
        takes its tasks back (unless they had already arrived here)."""
        if held and isinstance(msg, TransferDeliver):
            msg = TransferCancel(transfer=msg.transfer)
        if isinstance(msg, TransferPrepare):
            reservation = self.prepare(msg.transfer, msg.target, msg.count, now, msg.durations)
            return TransferPrepared(transfer=msg.transfer, tasks=reservation.tasks)
        if isinstance(msg, TransferDeliver):
            outcome = self.deliver(msg.transfer, msg.tasks)
            return TransferOutcome(transfer=msg.transfer, outcome=outcome)
        if isinstance(msg, TransferCancel):
            return TransferOutcome(transfer=msg.transfer, outcome=self.cancel(msg.transfer))
        if isinstance(msg, TransferCommit):
            return TransferSettled(transfer=msg.transfer, outcome=self.commit(msg.transfer))
        if isinstance(msg, TransferAbort):
            return TransferSettled(transfer=msg.transfer, outcome=self.abort(msg.transfer))
        return TransferReservations(
            reservations=tuple(
                ReservationInfo(transfer=r.transfer, target=r.target, tasks=len(r.tasks))
                for r in self.reserved.values()
            )
        )

    # --- views -------------------------------------------------------------------------------

    @property
    def reserved_count(self) -> int:
        return sum(len(r.tasks) for r in self.reserved.values())

    def drain_counts(self) -> DrainCounts:
        """The counts of a drain report (the node's `DrainReport`, a simulated server's)."""
        return DrainCounts(
            queued=len(self.queued),
            running=len(self.running),
            reserved=self.reserved_count,
            completed=self.completed,
            transferred_out=self.transferred_out,
        )

    def task_ids(self) -> dict[str, list[str]]:
        """Where every task is, by id (for conservation checks)."""
        return {
            "queued": [t.id for t in self.queued],
            "running": list(self.running),
            "reserved": [t.id for r in self.reserved.values() for t in r.tasks],
            "completed": list(self._done_ids),
        }

    def to_json_data(self) -> dict[str, Any]:
        """Everything needed to come back after a crash (running tasks run again)."""
        return {
            "queued": [t.model_dump() for t in (*self.running.values(), *self.queued)],
            "reserved": [
                {
                    "transfer": r.transfer,
                    "target": r.target,
                    "since": r.since,
                    "tasks": [t.model_dump() for t in r.tasks],
                }
                for r in self.reserved.values()
            ],
            "completed": self.completed,
            "transferred_in": self.transferred_in,
            "transferred_out": self.transferred_out,
            "done_ids": list(self._done_ids),
            "incoming": dict(self._incoming),
            "settled": list(self._settled),
        }

    @classmethod
    def from_json_data(
        cls, data: dict[str, Any], order: QueueOrder = "longest-first", track_changes: bool = False
    ) -> TaskLedger:
        """The ledger `to_json_data` described (changes are tracked from here on)."""
        ledger = cls(order)
        ledger.submit([Task.model_validate(t) for t in data.get("queued", [])])
        for r in data.get("reserved", []):
            tasks = tuple(Task.model_validate(t) for t in r["tasks"])
            ledger.reserved[r["transfer"]] = Reservation(
                r["transfer"], r["target"], tasks, float(r["since"])
            )
        ledger.completed = int(data.get("completed", 0))
        ledger.transferred_in = int(data.get("transferred_in", 0))
        ledger.transferred_out = int(data.get("transferred_out", 0))
        ledger._done_ids = OrderedDict.fromkeys(data.get("done_ids", []))
        ledger._incoming = OrderedDict(data.get("incoming", {}))
        ledger._settled = OrderedDict.fromkeys(data.get("settled", []))
        ledger.track_changes = track_changes
        return ledger


def _longest_first(task: Task) -> float:
    return -task.duration_s
