"""Topology change as a protocol: drain the servers a new topology removes, then retire them.

The balancer owns the desired topology. `Migration.adopt(desired, now)` makes it current;
every server of the old topology that it leaves out starts *retiring*. The machine then
hands its shell intents to carry out and consumes their outcomes:

- `HoldServer(s)`: ask a retiring server to start nothing more and take no new work, and
  to report what it holds (`DrainRequest(hold=True)`, answered by a `DrainReport`, fed
  back as a `ServerReport`). Re-sent every `probe_interval_s`: it is also the poll.
- `MoveQueued(source, target, count)`: a two-phase transfer of up to `count` queued tasks
  to a server of the new topology, chosen by least pressure (`policy.plan_drain`) among
  those not still being released (a held server refuses deliveries: planning onto one
  would fail and be planned again, over and over, until its release got through); the
  shell answers each with exactly one `TransferDone(source, target, moved)` (0 on failure).
- `RequeueRunning(s)`: once `drain_grace_s` has passed, stop its running tasks and queue
  them again from scratch (`DrainRequest(hold=True, requeue_running=True)`); they then
  move like any queued task.
- `Retired(s)`: it holds nothing (a report taken under the hold says 0 queued, running
  and reserved, and no transfer of it is in doubt or in flight): it may be stopped and its
  storage deleted. A held server never takes work again, so that report is final. A
  `Retired` carried out after a newer topology brought the server back is stale: the
  shell ignores it (the server is in `topology`, and is being released).
- `ReleaseServer(s)`: a retiring (or retired) server came back in a newer topology: lift its hold
  (`DrainRequest(hold=False)`); it keeps what it still holds. Re-sent until a report says
  it is no longer held.

Request numbers: every `DrainRequest` the drain intents become carries a number (`seq`,
from one counter that only grows and is persisted), and its `DrainReport` echoes it
(`answers`). A hold after a release (or a release after a hold) gets a new number; a
request re-sent as a poll keeps its own (or no answer slower than the probe interval would
ever count). Only a report answering the latest request sent to its server counts; an
older one is a `StaleMessage`. Without that, a "held, holds nothing" report answering a
hold could overtake the release that followed it (the server came back) and, once the
server was removed again, pass for the answer to the new hold: the migration would retire
a server that had taken work meanwhile, or was about to. The server keeps the number of
the latest request it applied (`HoldState`, persisted with its hold) and does not apply
an older one, so a release overtaken by the newer hold cannot lift it either. New numbers
are at least the wall clock in microseconds: they grow across a balancer that lost its
saved state, too.

A drain move that moved nothing (its target refused: a hold that outlived its release, a
state restored from disk) sends its target a release and leaves its source to its next
probe, so a move that keeps failing is retried at the probe interval, not in a loop.

A newer topology adopted mid-way supersedes the migration: servers it removes start
retiring too, retiring servers it brings back are released, the rest go on draining.

Time: `now` is wall-clock seconds (`time.time()`), because the grace deadlines are
persisted (`to_json_data` / `from_json_data`) and must survive a restart of the balancer.
Transfers in flight at a restart are the transfer protocol's business (they are resolved
as in doubt); the restored machine simply plans again from fresh reports.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from treewave.core.api import MigrationStatus, RetiredServer, RetiringServer
from treewave.core.errors import LocalProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.policy import Load, plan_drain
from treewave.core.topology import Topology, TopologyError

__all__ = [
    "DEFAULT_PROBE_INTERVAL_S",
    "MAX_TASKS_PER_MOVE",
    "MOVE_TIMEOUT_S",
    "HoldServer",
    "HoldState",
    "Intent",
    "Migration",
    "MigrationPhase",
    "MoveQueued",
    "Outcome",
    "ReleaseServer",
    "RequeueRunning",
    "Retired",
    "ServerReport",
    "TargetLoads",
    "TransferDone",
]

DEFAULT_PROBE_INTERVAL_S = 1.0
MAX_TASKS_PER_MOVE = 1000
"""Tasks per transfer at most (a transfer's tasks travel in one frame)."""
MOVE_TIMEOUT_S = 120.0
"""A move whose `TransferDone` has not come back after this long is forgotten (planning
again is safe: a prepare only reserves what is still queued)."""
JSON_VERSION = 1
MAX_RETIRED_KEPT = 10_000
"""Retired servers remembered (for the shells that stop them and delete their storage)."""


class MigrationPhase(Enum):
    STEADY = "steady"
    """No server is retiring."""
    DRAINING = "draining"
    """Some servers are retiring: they still hold tasks (or have not reported yet)."""


# --- intents (machine -> shell) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HoldState:
    """A server's side of the drain requests: whether it is held, and the number of the
    latest request it applied. A request numbered below that one is answered but not
    applied: an old hold replayed or overtaken after its release (or an old release after
    a newer hold) must not undo the newer request, or a server could take work while the
    balancer retires it on the strength of an answer to the newer hold. Unnumbered
    requests (`seq` 0, from a balancer older than the numbering) are always applied."""

    held: bool = False
    seq: int = 0

    def applies(self, seq: int) -> bool:
        return seq == 0 or seq >= self.seq

    def after(self, hold: bool, seq: int) -> HoldState:
        """The state once a request (`hold`, `seq`) has arrived."""
        if not self.applies(seq):
            return self
        return HoldState(hold, max(self.seq, seq))


@dataclass(frozen=True, slots=True)
class HoldServer:
    server: str
    seq: int = field(default=0, compare=False)
    """The request's number (`DrainRequest.seq`); not part of what is asked."""


@dataclass(frozen=True, slots=True)
class RequeueRunning:
    server: str
    seq: int = field(default=0, compare=False)
    """The request's number (`DrainRequest.seq`); not part of what is asked."""


@dataclass(frozen=True, slots=True)
class ReleaseServer:
    server: str
    seq: int = field(default=0, compare=False)
    """The request's number (`DrainRequest.seq`); not part of what is asked."""


@dataclass(frozen=True, slots=True)
class MoveQueued:
    source: str
    target: str
    count: int


@dataclass(frozen=True, slots=True)
class Retired:
    server: str


Intent = HoldServer | RequeueRunning | ReleaseServer | MoveQueued | Retired


# --- outcomes (shell -> machine) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerReport:
    """A retiring (or released) server's `DrainReport`, plus what only the shell knows:
    `in_doubt`, the transfers with this server as donor or recipient whose outcome is not
    settled yet (it must not retire before they are)."""

    server: str
    held: bool
    queued: int
    running: int
    reserved: int
    completed: int = 0
    transferred_out: int = 0
    requeued: int = 0
    in_doubt: int = 0
    answers: int = 0
    """The number of the request it answers (`DrainReport.answers`)."""

    @property
    def holds_nothing(self) -> bool:
        return self.queued == self.running == self.reserved == self.in_doubt == 0


@dataclass(frozen=True, slots=True)
class TransferDone:
    """The end of one `MoveQueued`: `moved` tasks are now queued at the target."""

    source: str
    target: str
    moved: int


@dataclass(frozen=True, slots=True)
class TargetLoads:
    """The new topology's loads (from an Echo snapshot), for choosing targets."""

    loads: tuple[Load, ...]


Outcome = ServerReport | TransferDone | TargetLoads


# --- the machine ------------------------------------------------------------------------------


@dataclass
class _Retiring:
    """One retiring server's drain."""

    name: str
    since: float
    report: ServerReport | None = None
    fresh: bool = False
    """A report came in since moves were last planned from it."""
    next_probe: float = -math.inf
    outstanding: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Moves in flight: target -> (tasks planned, when)."""
    baseline_out: int | None = None
    baseline_completed: int | None = None
    requeued: int = 0

    def moved(self) -> int:
        if self.report is None or self.baseline_out is None:
            return 0
        return max(0, self.report.transferred_out - self.baseline_out)

    def completed_here(self) -> int:
        if self.report is None or self.baseline_completed is None:
            return 0
        return max(0, self.report.completed - self.baseline_completed)


class Migration:
    """The balancer's side of topology changes (see the module docstring)."""

    def __init__(
        self, topology: Topology, probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S
    ) -> None:
        if not isinstance(topology, Topology):
            raise LocalProtocolError(f"a Topology is needed, not {type(topology).__name__}")
        if probe_interval_s <= 0:
            raise LocalProtocolError("probe_interval_s must be > 0")
        self.topology = topology
        self.probe_interval_s = probe_interval_s
        self._retiring: dict[str, _Retiring] = {}
        self._releasing: dict[str, float] = {}
        """Servers to release -> when to ask next."""
        self._seq = 0
        """The last request number given out."""
        self._asked: dict[str, tuple[int, bool]] = {}
        """Server -> the number of the latest request sent to it (only its answer counts),
        and whether it holds: a request re-sent as a poll keeps its number (a new number at
        every probe would make every answer slower than `probe_interval_s` stale)."""
        self._retired: dict[str, dict[str, int]] = {}
        """Servers retired (in this or an earlier migration, until one brings them back)
        -> what the drain did there."""
        self._loads: dict[str, Load] = {}
        self._planned_in: dict[str, int] = {}
        """Tasks sent to each target since the last `TargetLoads`."""

    # --- queries ----------------------------------------------------------------------------

    @property
    def phase(self) -> MigrationPhase:
        return MigrationPhase.DRAINING if self._retiring else MigrationPhase.STEADY

    @property
    def retiring(self) -> frozenset[str]:
        return frozenset(self._retiring)

    @property
    def releasing(self) -> frozenset[str]:
        return frozenset(self._releasing)

    @property
    def retired(self) -> frozenset[str]:
        return frozenset(self._retired)

    @property
    def grace_s(self) -> float:
        return self.topology.settings.drain_grace_s

    def latest_request(self, server: str) -> int:
        """The number of the latest drain request sent to `server` (0: none)."""
        return self._asked.get(server, (0, False))[0]

    def status(self, now: float) -> MigrationStatus:
        """The `migration` object of `GET /api/topology`."""
        retiring: dict[str, RetiringServer] = {}
        for name, r in sorted(self._retiring.items()):
            rep = r.report
            retiring[name] = RetiringServer(
                queued=rep.queued if rep else None,
                running=rep.running if rep else None,
                reserved=rep.reserved if rep else None,
                held=rep.held if rep else False,
                reported=rep is not None,
                moved=r.moved(),
                requeued=r.requeued,
                grace_left_s=round(max(0.0, r.since + self.grace_s - now), 3),
            )
        return MigrationStatus(
            state="draining" if self.phase is MigrationPhase.DRAINING else "steady",
            drain_grace_s=self.grace_s,
            retiring=retiring,
            retired={n: RetiredServer(**c) for n, c in sorted(self._retired.items())},
            releasing=sorted(self._releasing),
        )

    # --- inputs -------------------------------------------------------------------------------

    def adopt(self, desired: Topology, now: float) -> list[Intent]:
        """Make `desired` the topology; start (or supersede) the migration to it."""
        if not isinstance(desired, Topology):
            raise LocalProtocolError(f"a Topology is needed, not {type(desired).__name__}")
        if desired.to_json_data() == self.topology.to_json_data():
            return []
        out: list[Intent] = []
        # A retired server still holds its hold (it may not even be stopped yet): one that
        # comes back must be released, or it would never start a task again.
        for name in sorted(self._retired):
            if name in desired:
                del self._retired[name]
                self._releasing[name] = now + self.probe_interval_s
                out.append(ReleaseServer(name, self._number(name, False, now)))
        for name in self.topology.names:
            if name not in desired and name not in self._retiring:
                self._retiring[name] = _Retiring(name, since=now)
                # Removed again before its release got through: it is held anew instead
                # (else its held reports would pass for a release still on its way).
                self._releasing.pop(name, None)
        for name in sorted(self._retiring):
            if name in desired:
                del self._retiring[name]
                self._releasing[name] = now + self.probe_interval_s
                out.append(ReleaseServer(name, self._number(name, False, now)))
        self.topology = desired
        self._loads = {n: x for n, x in self._loads.items() if n in desired}
        self._planned_in = {}
        keep = set(desired.names) | set(self._retiring) | set(self._retired)
        self._asked = {n: k for n, k in self._asked.items() if n in keep}
        for _, r in sorted(self._retiring.items()):
            out.append(self._probe(r, now))
        return out

    def receive(self, outcome: Outcome, now: float) -> list[Intent]:
        if isinstance(outcome, ServerReport):
            return self._on_report(outcome, now)
        if isinstance(outcome, TransferDone):
            return self._on_transfer_done(outcome, now)
        if isinstance(outcome, TargetLoads):
            self._loads = {x.name: x for x in outcome.loads if x.name in self.topology}
            self._planned_in = {}
            return []
        raise LocalProtocolError(f"not a migration outcome: {type(outcome).__name__}")

    def handle_timer(self, now: float) -> list[Intent]:
        out: list[Intent] = []
        for _, r in sorted(self._retiring.items()):
            for target, (_, when) in list(r.outstanding.items()):
                if now - when > MOVE_TIMEOUT_S:
                    del r.outstanding[target]
            if now >= r.next_probe:
                out.append(self._probe(r, now))
        for name, when in sorted(self._releasing.items()):
            if now >= when:
                self._releasing[name] = now + self.probe_interval_s
                out.append(ReleaseServer(name, self._number(name, False, now)))
        return out

    def next_deadline(self) -> float | None:
        """When `handle_timer` next has something to do (wall-clock seconds): a probe, a
        release to send again, or a move to forget; None when nothing is pending."""
        times = [r.next_probe for r in self._retiring.values()]
        times += [
            when + MOVE_TIMEOUT_S + 1e-3
            for r in self._retiring.values()
            for _, when in r.outstanding.values()
        ]
        times += self._releasing.values()
        return min(times, default=None)

    # --- internals ----------------------------------------------------------------------------

    def _number(self, server: str, hold: bool, now: float) -> int:
        """The number of a request to `server`: a new one (making every earlier answer
        stale) when it turns a release into a hold or back, else the latest one again.
        New numbers are at least the wall clock in microseconds, so they keep growing
        across a balancer that starts over without its saved state (servers ignore a
        request numbered below one they applied: `HoldState`)."""
        seq, held = self._asked.get(server, (0, not hold))
        if held != hold:
            self._seq = max(self._seq + 1, int(now * 1_000_000))
            seq = self._seq
            self._asked[server] = (seq, hold)
        return seq

    def _probe(self, r: _Retiring, now: float) -> Intent:
        """Hold-and-report, or requeue once the grace has passed and tasks still run."""
        r.next_probe = now + self.probe_interval_s
        past_grace = now >= r.since + self.grace_s
        if past_grace and (r.report is None or r.report.running > 0):
            return RequeueRunning(r.name, self._number(r.name, True, now))
        return HoldServer(r.name, self._number(r.name, True, now))

    def _on_report(self, rep: ServerReport, now: float) -> list[Intent]:
        counts = (
            rep.queued,
            rep.running,
            rep.reserved,
            rep.completed,
            rep.transferred_out,
            rep.requeued,
            rep.in_doubt,
            rep.answers,
        )
        if any(not isinstance(c, int) or c < 0 for c in counts):
            raise RemoteProtocolError(
                f"report of {rep.server!r}: counts must be whole numbers >= 0", "invalid_fields"
            )
        latest = self.latest_request(rep.server)
        if rep.answers != latest:
            # Older: a newer request was sent since (its answer is the one that counts).
            # Newer: not a request this machine sent (a restart from older state).
            raise StaleMessage(
                f"report of {rep.server!r} answers request {rep.answers}, not the latest ({latest})"
            )
        if rep.server in self._releasing:
            if rep.held:
                return []
            del self._releasing[rep.server]
            return self._plan(now)  # it can take drained tasks now
        r = self._retiring.get(rep.server)
        if r is None and rep.held and rep.server in self.topology:
            # A hold that outlived a restart: release it again.
            self._releasing[rep.server] = now + self.probe_interval_s
            return [ReleaseServer(rep.server, self._number(rep.server, False, now))]
        if r is None:
            raise StaleMessage(f"report of {rep.server!r}, which is not retiring")
        if r.baseline_out is None:
            r.baseline_out = rep.transferred_out
            r.baseline_completed = rep.completed
        r.report = rep
        r.fresh = True
        r.requeued += rep.requeued
        if rep.held and rep.holds_nothing and not r.outstanding:
            del self._retiring[rep.server]
            # Kept across migrations (a shell may learn of a retirement only after the next
            # change started, or after a restart); bounded, oldest first out.
            while len(self._retired) >= MAX_RETIRED_KEPT:
                del self._retired[next(iter(self._retired))]
            self._retired[rep.server] = {
                "moved": r.moved(),
                "completed": r.completed_here(),
                "requeued": r.requeued,
            }
            return [Retired(rep.server)]
        return self._plan(now)

    def _on_transfer_done(self, done: TransferDone, now: float) -> list[Intent]:
        r = self._retiring.get(done.source)
        if r is None or done.target not in r.outstanding:
            raise StaleMessage(f"no move from {done.source!r} to {done.target!r} in flight")
        planned, _ = r.outstanding[done.target]
        if not isinstance(done.moved, int) or not 0 <= done.moved <= planned:
            raise RemoteProtocolError(
                f"move {done.source}->{done.target}: moved {done.moved!r} of {planned} planned",
                "invalid_fields",
            )
        del r.outstanding[done.target]
        r.fresh = False  # what it holds changed: plan again from a newer report
        out: list[Intent] = []
        if done.moved == 0 and done.target in self.topology and done.target not in self._releasing:
            # Nothing arrived: the target may be held by a hold that outlived its release
            # (a request replayed or overtaken, a state restored from disk), and it would
            # refuse every move planned onto it. Releasing is idempotent: it is asked to,
            # and planned onto again once it answers that it is not held.
            self._releasing[done.target] = now + self.probe_interval_s
            out.append(ReleaseServer(done.target, self._number(done.target, False, now)))
        if r.outstanding:
            return out
        if done.moved == 0:
            # Asked again at its next probe, not at once: a move that keeps failing is
            # retried at the probe interval, not in a loop of transfers at one instant.
            return out
        # Ask at once rather than at the next probe: the drain goes on without a pause.
        return [*out, self._probe(r, now)]

    def _plan(self, now: float) -> list[Intent]:
        """Moves for every retiring server with a fresh report, queued tasks and nothing in
        flight, spread together over the new topology by least pressure."""
        sources = {
            name: r.report.queued
            for name, r in self._retiring.items()
            if r.fresh and r.report is not None and r.report.queued > 0 and not r.outstanding
        }
        if not sources:
            return []
        task_s = self.topology.settings.task_time_s
        targets = []
        for spec in self.topology.servers:
            if spec.name in self._releasing:
                continue  # still held: it would refuse the delivery
            base = self._loads.get(spec.name, Load(spec.name, spec.cpus))
            extra = (task_s,) * self._planned_in.get(spec.name, 0)
            targets.append(Load(spec.name, spec.cpus, base.running_left, base.queued + extra))
        if not targets:
            return []  # every server of the topology is still being released: later
        moves = plan_drain(sources, targets, task_s, MAX_TASKS_PER_MOVE)
        out: list[Intent] = []
        for m in moves:
            r = self._retiring[m.source]
            planned, _ = r.outstanding.get(m.target, (0, now))
            r.outstanding[m.target] = (planned + m.tasks, now)
            self._planned_in[m.target] = self._planned_in.get(m.target, 0) + m.tasks
        # One transfer per (source, target): TransferDone names only the pair.
        for name in sources:
            r = self._retiring[name]
            r.fresh = False
            for target, (count, _) in sorted(r.outstanding.items()):
                out.append(MoveQueued(name, target, count))
        return out

    # --- persistence --------------------------------------------------------------------------

    def to_json_data(self) -> dict[str, Any]:
        """Everything needed to resume after a restart (moves in flight are not kept)."""
        return {
            "version": JSON_VERSION,
            "topology": self.topology.to_json_data(),
            "probe_interval_s": self.probe_interval_s,
            "retiring": {
                name: {
                    "since": r.since,
                    "report": None if r.report is None else asdict(r.report),
                    "baseline_out": r.baseline_out,
                    "baseline_completed": r.baseline_completed,
                    "requeued": r.requeued,
                }
                for name, r in sorted(self._retiring.items())
            },
            "releasing": sorted(self._releasing),
            "retired": dict(self._retired.items()),
            "seq": self._seq,
            "asked": {n: list(a) for n, a in sorted(self._asked.items())},
        }

    @classmethod
    def from_json_data(cls, data: Any) -> Migration:
        """The machine `to_json_data` saved; a damaged document is a LocalProtocolError."""
        try:
            if data.get("version") != JSON_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            m = cls(Topology.parse(data["topology"]), float(data["probe_interval_s"]))
            for name, r in data["retiring"].items():
                if name in m.topology:
                    raise ValueError(f"{name!r} is both retiring and in the topology")
                rep = r["report"]
                m._retiring[name] = _Retiring(
                    name,
                    since=float(r["since"]),
                    report=None if rep is None else ServerReport(**rep),
                    baseline_out=r["baseline_out"],
                    baseline_completed=r["baseline_completed"],
                    requeued=int(r["requeued"]),
                )
            m._releasing = dict.fromkeys(data["releasing"], -math.inf)
            m._retired = {
                str(n): {k: int(v) for k, v in d.items()} for n, d in data["retired"].items()
            }
            # Absent from state saved before requests were numbered: numbering starts over
            # (a restart drops every link, and with it every answer still under way).
            m._seq = int(data.get("seq", 0))
            m._asked = {str(n): (int(k), bool(h)) for n, (k, h) in data.get("asked", {}).items()}
            if any(k > m._seq or k < 0 for k, _ in m._asked.values()):
                raise ValueError("a request number above the last one given out")
        except (TopologyError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LocalProtocolError(f"saved migration is damaged: {exc}") from None
        return m
