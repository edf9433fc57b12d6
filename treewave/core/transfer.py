"""The two-phase transfer coordinator, sans-IO: the balancer's side of moving queued tasks.

A transfer moves up to `count` queued tasks from a donor (`source`) to a recipient
(`target`); the participants' side is `TaskLedger.answer`. Per transfer:

    PREPARING   prepare -> donor: it reserves up to `count` tasks (maybe none: DONE)
    DELIVERING  deliver -> recipient: it enqueues them, idempotently by transfer id
    COMMITTING  commit  -> donor: it drops the reservation (the recipient has the tasks)
    ABORTING    abort   -> donor: it requeues the reservation (the recipient refused)
    IN_DOUBT    a step went unanswered: cancel -> recipient, whose answer is final
                (`accepted` if it has the tasks, else it refuses them for good)
    DONE

Safety rests on one rule: the donor is told to commit only after the recipient said
`accepted` and to abort only after it said `cancelled`; both answers are pinned at the
recipient, so retrying any step, or asking again after a restart, cannot change the
verdict. Unanswered steps are retried from `handle_timer`. A fresh coordinator (the
balancer restarted) learns the reservations nobody is resolving from `link_up`, which asks
the server for them, and resolves them through IN_DOUBT like any other.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from treewave.core.errors import LocalProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.ledger import TransferReply, TransferRequest
from treewave.core.messages import (
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
    "REMEMBERED_DONE",
    "TransferCoordinator",
    "TransferDone",
    "TransferOutput",
    "TransferPhase",
    "TransferResult",
    "TransferSend",
]

REMEMBERED_DONE = 10_000
"""Finished transfer ids kept so their late replies are told apart from unknown ones."""


class TransferPhase(Enum):
    PREPARING = "preparing"
    DELIVERING = "delivering"
    COMMITTING = "committing"
    ABORTING = "aborting"
    IN_DOUBT = "in_doubt"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class TransferSend:
    """Send `message` to the server called `to`."""

    to: str
    message: TransferRequest


@dataclass(frozen=True, slots=True)
class TransferResult:
    """The answer for whoever called `start` (exactly once per started transfer):
    `moved` tasks now belong to the recipient. `in_doubt`: a step went unanswered; the
    coordinator keeps resolving it (moved counts the tasks if the recipient accepted)."""

    transfer: str
    moved: int
    outcome: Literal["committed", "aborted", "empty", "in_doubt"]


@dataclass(frozen=True, slots=True)
class TransferDone:
    """A transfer reached DONE (also one recovered after a restart): for the metrics."""

    transfer: str
    outcome: Literal["committed", "aborted", "empty"]
    moved: int


TransferOutput = TransferSend | TransferResult | TransferDone


@dataclass(slots=True)
class _Transfer:
    tid: str
    source: str
    target: str
    count: int
    phase: TransferPhase
    durations: tuple[float, ...] | None = None
    tasks: tuple[Task, ...] = ()
    reserved: int = 0
    """Tasks the donor holds for it (known from `prepared` or a reservation report)."""
    accepted: bool | None = None
    awaiting: str | None = None
    """Who should answer the step in flight; None while waiting to retry."""
    deadline: float = 0.0
    """When the step in flight times out, or when to retry."""
    reported: bool = False
    """Whether the `TransferResult` went out (a recovered transfer has no caller)."""


class TransferCoordinator:
    """Any number of concurrent transfers between the servers named in `servers`.

    `instance` makes transfer ids unique across restarts (a fresh coordinator must not
    reuse an id a participant still remembers)."""

    def __init__(
        self,
        servers: Iterable[str],
        instance: str,
        step_timeout_s: float = 2.0,
        retry_s: float = 1.0,
    ) -> None:
        if step_timeout_s <= 0 or retry_s <= 0:
            raise LocalProtocolError("step_timeout_s and retry_s must be positive")
        self.servers = frozenset(servers)
        self.instance = instance
        self.step_timeout_s = step_timeout_s
        self.retry_s = retry_s
        self._active: dict[str, _Transfer] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._counter = 0
        self._unknown: set[str] = set(self.servers)
        """Servers whose reservations this coordinator has not heard yet (each is asked
        when its link comes up): one may hold a reservation naming any server."""

    # --- the surface ---------------------------------------------------------------------------

    def start(
        self,
        source: str,
        target: str,
        count: int,
        now: float,
        durations: tuple[float, ...] | None = None,
    ) -> tuple[str, list[TransferOutput]]:
        """Begin moving up to `count` queued tasks from `source` to `target` (of about
        these `durations`, if given: the donor picks the closest it has)."""
        if source not in self.servers or target not in self.servers:
            raise LocalProtocolError(f"transfer between unknown servers {source!r} -> {target!r}")
        if source == target:
            raise LocalProtocolError(f"transfer from {source!r} to itself")
        if count < 1:
            raise LocalProtocolError(f"transfer of {count} tasks")
        self._counter += 1
        tid = f"xfer-{self.instance}-{self._counter}"
        t = _Transfer(tid, source, target, count, TransferPhase.PREPARING, durations=durations)
        self._active[tid] = t
        return tid, self._ask(t, now)

    def receive(self, msg: TransferReply, now: float, sender: str) -> list[TransferOutput]:
        """Feed one participant's reply (`sender` is the link it came on). A reply for a
        transfer this coordinator does not drive (late, duplicated, or from before a
        restart) raises `StaleMessage`; one that breaks the protocol raises
        `RemoteProtocolError`; either way nothing changes."""
        if isinstance(msg, TransferReservations):
            return self._recover(msg, now, sender)
        t = self._active.get(msg.transfer)
        if t is None:
            raise StaleMessage(f"{msg.type} for transfer {msg.transfer}, which is not in flight")
        expected = t.target if isinstance(msg, TransferOutcome) else t.source
        if sender != expected:
            raise RemoteProtocolError(
                f"{sender!r} answered {msg.type} for transfer {t.tid}, expected {expected!r}",
                reason="not_participant",
            )
        if isinstance(msg, TransferPrepared):
            return self._prepared(t, msg, now)
        if isinstance(msg, TransferOutcome):
            return self._verdict(t, msg, now)
        return self._settled(t, msg)

    def handle_timer(self, now: float) -> list[TransferOutput]:
        """Time out unanswered steps and send the retries that are due."""
        out: list[TransferOutput] = []
        for t in list(self._active.values()):
            if now < t.deadline:
                continue
            if t.awaiting is None:
                out += self._ask(t, now)
            else:
                out += self._timed_out(t, now)
        return out

    def link_up(self, server: str, now: float) -> list[TransferOutput]:
        """`server` (re)connected: ask which reservations it holds, so none stays in doubt
        after a restart of either side. Retries waiting on it go out at once."""
        if server not in self.servers:
            raise LocalProtocolError(f"unknown server {server!r}")
        out: list[TransferOutput] = [TransferSend(server, TransferQuery())]
        for t in list(self._active.values()):
            if t.awaiting is None and server in (t.source, t.target):
                out += self._ask(t, now)
        return out

    def unreachable(self, server: str, now: float) -> list[TransferOutput]:
        """The shell could not send to `server`: its steps time out now (no retry is sent
        at once, so calling this again from the retries' own failures cannot loop)."""
        out: list[TransferOutput] = []
        for t in list(self._active.values()):
            if t.awaiting == server:
                out += self._timed_out(t, now)
        return out

    def phase(self, tid: str) -> TransferPhase:
        t = self._active.get(tid)
        if t is not None:
            return t.phase
        if tid in self._done:
            return TransferPhase.DONE
        raise LocalProtocolError(f"unknown transfer {tid!r}")

    @property
    def active(self) -> tuple[str, ...]:
        """Transfers not yet DONE."""
        return tuple(self._active)

    @property
    def in_doubt(self) -> tuple[str, ...]:
        """Transfers past PREPARING and not settled yet: the donor may hold their tasks."""
        preparing = TransferPhase.PREPARING
        return tuple(tid for tid, t in self._active.items() if t.phase is not preparing)

    def involving(self, server: str) -> int:
        """Transfers not yet DONE with `server` as donor or recipient, plus one while some
        server's reservations are not known yet (a server leaving the topology must not
        retire while any is unsettled: after a restart of the balancer a donor may still
        hold a reservation for it, whose verdict would be deleted with its storage)."""
        unknown = 1 if self._unknown else 0
        return unknown + sum(1 for t in self._active.values() if server in (t.source, t.target))

    @property
    def reservations_unknown(self) -> frozenset[str]:
        """Servers not yet asked (or not yet answered) which reservations they hold."""
        return frozenset(self._unknown)

    def set_servers(self, servers: Iterable[str]) -> None:
        """The servers transfers may now involve (the topology changed). Transfers in
        flight keep going; new ones need both ends in the set."""
        self.servers = frozenset(servers)
        self._unknown &= self.servers

    def next_deadline(self) -> float | None:
        return min((t.deadline for t in self._active.values()), default=None)

    # --- steps -----------------------------------------------------------------------------------

    def _request(self, t: _Transfer) -> TransferSend:
        """The request of `t`'s phase, to whoever must answer it."""
        p = t.phase
        if p is TransferPhase.PREPARING:
            return TransferSend(
                t.source,
                TransferPrepare(
                    transfer=t.tid, target=t.target, count=t.count, durations=t.durations
                ),
            )
        if p is TransferPhase.DELIVERING:
            return TransferSend(
                t.target, TransferDeliver(transfer=t.tid, source=t.source, tasks=t.tasks)
            )
        if p is TransferPhase.IN_DOUBT:
            return TransferSend(t.target, TransferCancel(transfer=t.tid))
        if p is TransferPhase.COMMITTING:
            return TransferSend(t.source, TransferCommit(transfer=t.tid))
        if p is TransferPhase.ABORTING:
            return TransferSend(t.source, TransferAbort(transfer=t.tid))
        raise LocalProtocolError(f"transfer {t.tid} is {p.value}: nothing to send")

    def _ask(self, t: _Transfer, now: float) -> list[TransferOutput]:
        send = self._request(t)
        t.awaiting = send.to
        t.deadline = now + self.step_timeout_s
        return [send]

    def _timed_out(self, t: _Transfer, now: float) -> list[TransferOutput]:
        out: list[TransferOutput] = []
        if t.phase in (TransferPhase.PREPARING, TransferPhase.DELIVERING):
            # The donor may have reserved (or the recipient accepted) without our hearing:
            # ask the recipient for its final verdict at once.
            if t.phase is TransferPhase.PREPARING:
                out += self._report(t, 0, "in_doubt")
            t.phase = TransferPhase.IN_DOUBT
            return out + self._ask(t, now)
        # A resolution step went unanswered: tell the caller what is known, retry later.
        out += self._report(t, t.reserved if t.accepted else 0, "in_doubt")
        t.awaiting = None
        t.deadline = now + self.retry_s
        return out

    def _prepared(self, t: _Transfer, msg: TransferPrepared, now: float) -> list[TransferOutput]:
        if t.phase is not TransferPhase.PREPARING:
            raise StaleMessage(f"transfer {t.tid}: late transfer.prepared ({t.phase.value})")
        if len(msg.tasks) > t.count or len({task.id for task in msg.tasks}) != len(msg.tasks):
            raise RemoteProtocolError(
                f"transfer {t.tid}: {t.source!r} reserved {len(msg.tasks)} tasks "
                f"(asked for at most {t.count}, each once)",
                reason="invalid_fields",
            )
        if not msg.tasks:
            return self._finish(t, "empty", 0)
        t.tasks = msg.tasks
        t.reserved = len(msg.tasks)
        t.phase = TransferPhase.DELIVERING
        return self._ask(t, now)

    def _verdict(self, t: _Transfer, msg: TransferOutcome, now: float) -> list[TransferOutput]:
        if t.phase not in (TransferPhase.DELIVERING, TransferPhase.IN_DOUBT):
            raise StaleMessage(f"transfer {t.tid}: late transfer.outcome ({t.phase.value})")
        t.accepted = msg.outcome == "accepted"
        t.phase = TransferPhase.COMMITTING if t.accepted else TransferPhase.ABORTING
        return self._ask(t, now)

    def _settled(self, t: _Transfer, msg: TransferSettled) -> list[TransferOutput]:
        if t.phase not in (TransferPhase.COMMITTING, TransferPhase.ABORTING):
            raise StaleMessage(f"transfer {t.tid}: late transfer.settled ({t.phase.value})")
        wrong = "aborted" if t.phase is TransferPhase.COMMITTING else "committed"
        if msg.outcome == wrong:
            raise RemoteProtocolError(
                f"transfer {t.tid}: {t.source!r} answered {wrong} to {t.phase.value}",
                reason="invalid_fields",
            )
        if t.phase is TransferPhase.COMMITTING:
            return self._finish(t, "committed", t.reserved)
        return self._finish(t, "aborted", 0)

    def _finish(
        self, t: _Transfer, outcome: Literal["committed", "aborted", "empty"], moved: int
    ) -> list[TransferOutput]:
        t.phase = TransferPhase.DONE
        del self._active[t.tid]
        self._done[t.tid] = None
        while len(self._done) > REMEMBERED_DONE:
            self._done.popitem(last=False)
        return [*self._report(t, moved, outcome), TransferDone(t.tid, outcome, moved)]

    def _report(
        self,
        t: _Transfer,
        moved: int,
        outcome: Literal["committed", "aborted", "empty", "in_doubt"],
    ) -> list[TransferOutput]:
        if t.reported:
            return []
        t.reported = True
        return [TransferResult(t.tid, moved, outcome)]

    def _recover(self, msg: TransferReservations, now: float, donor: str) -> list[TransferOutput]:
        """Reservations `donor` holds that no transfer here drives: resolve each."""
        self._unknown.discard(donor)
        out: list[TransferOutput] = []
        for r in msg.reservations:
            if r.transfer in self._active or r.transfer in self._done:
                continue
            if r.target not in self.servers or r.target == donor or donor not in self.servers:
                continue  # nobody to ask; the operator sees it in the donor's state
            t = _Transfer(
                r.transfer,
                donor,
                r.target,
                max(r.tasks, 1),
                TransferPhase.IN_DOUBT,
                reserved=r.tasks,
                reported=True,
            )
            self._active[t.tid] = t
            out += self._ask(t, now)
        return out
