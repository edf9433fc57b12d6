"""A server's tasks and its side of two-phase transfers (pure, no I/O).

Every task is in exactly one place: queued, running, reserved for a transfer, or completed.
A transfer moves tasks only through `prepare` (queued -> reserved) and then `commit`
(dropped: the recipient has them) or `abort` (back to the queue). The recipient's side is
idempotent by transfer id: `deliver` twice enqueues once; `cancel` before `deliver` makes
a later `deliver` refuse, so the balancer can always find out which way a transfer went.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Literal

from treewave.core.messages import Task

REMEMBERED_TRANSFERS = 10_000
REMEMBERED_COMPLETIONS = 200_000


@dataclass(frozen=True, slots=True)
class Reservation:
    transfer: str
    target: str
    tasks: tuple[Task, ...]
    since: float


class TaskLedger:
    def __init__(self) -> None:
        self.queued: deque[Task] = deque()
        self.running: dict[str, Task] = {}
        self.reserved: dict[str, Reservation] = {}
        self.completed = 0
        self.transferred_in = 0
        self.transferred_out = 0
        self._known_ids: set[str] = set()
        self._done_ids: OrderedDict[str, None] = OrderedDict()
        self._incoming: OrderedDict[str, Literal["accepted", "cancelled"]] = OrderedDict()

    # --- local work ------------------------------------------------------------------------

    def submit(self, tasks: tuple[Task, ...] | list[Task]) -> int:
        """Queue new tasks; a task id already here (or already completed) is skipped."""
        added = 0
        for task in tasks:
            if task.id in self._known_ids or task.id in self._done_ids:
                continue
            self._known_ids.add(task.id)
            self.queued.append(task)
            added += 1
        return added

    def start_next(self) -> Task | None:
        """Move the oldest queued task to running."""
        if not self.queued:
            return None
        task = self.queued.popleft()
        self.running[task.id] = task
        return task

    def finish(self, task_id: str) -> bool:
        """Running -> completed; completion is counted once per task id."""
        if self.running.pop(task_id, None) is None:
            return False
        self._known_ids.discard(task_id)
        if task_id in self._done_ids:
            return False
        self._done_ids[task_id] = None
        while len(self._done_ids) > REMEMBERED_COMPLETIONS:
            self._done_ids.popitem(last=False)
        self.completed += 1
        return True

    def requeue_running(self) -> int:
        """Running -> the front of the queue, to start again from scratch (as after a
        crash): how a server leaving the topology gives up its running tasks once its
        drain grace has passed. Returns how many."""
        tasks = list(self.running.values())
        self.running.clear()
        self.queued.extendleft(reversed(tasks))
        return len(tasks)

    # --- donor side --------------------------------------------------------------------------

    def prepare(self, transfer: str, target: str, count: int, now: float) -> Reservation:
        """Reserve up to `count` of the most recently queued tasks (idempotent)."""
        if transfer in self.reserved:
            return self.reserved[transfer]
        take = min(count, len(self.queued))
        tasks = tuple(self.queued.pop() for _ in range(take))[::-1]
        reservation = Reservation(transfer, target, tasks, now)
        if tasks:
            self.reserved[transfer] = reservation
        return reservation

    def commit(self, transfer: str) -> Literal["committed", "unknown"]:
        reservation = self.reserved.pop(transfer, None)
        if reservation is None:
            return "unknown"
        for task in reservation.tasks:
            self._known_ids.discard(task.id)
        self.transferred_out += len(reservation.tasks)
        return "committed"

    def abort(self, transfer: str) -> Literal["aborted", "unknown"]:
        reservation = self.reserved.pop(transfer, None)
        if reservation is None:
            return "unknown"
        self.queued.extend(reservation.tasks)
        return "aborted"

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

    def _remember(self, transfer: str, outcome: Literal["accepted", "cancelled"]) -> None:
        self._incoming[transfer] = outcome
        while len(self._incoming) > REMEMBERED_TRANSFERS:
            self._incoming.popitem(last=False)

    # --- views -------------------------------------------------------------------------------

    @property
    def reserved_count(self) -> int:
        return sum(len(r.tasks) for r in self.reserved.values())

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
        }

    @classmethod
    def from_json_data(cls, data: dict[str, Any]) -> TaskLedger:
        ledger = cls()
        ledger.submit([Task.model_validate(t) for t in data.get("queued", [])])
        for r in data.get("reserved", []):
            tasks = tuple(Task.model_validate(t) for t in r["tasks"])
            ledger.reserved[r["transfer"]] = Reservation(
                r["transfer"], r["target"], tasks, float(r["since"])
            )
            ledger._known_ids.update(t.id for t in tasks)
        ledger.completed = int(data.get("completed", 0))
        ledger.transferred_in = int(data.get("transferred_in", 0))
        ledger.transferred_out = int(data.get("transferred_out", 0))
        ledger._done_ids = OrderedDict.fromkeys(data.get("done_ids", []))
        ledger._incoming = OrderedDict(data.get("incoming", {}))
        return ledger
