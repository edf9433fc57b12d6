"""The balancer's asyncio shell: links, futures, the timer, the state file and metrics.

Its rules live in the core's `BalancerMachine` (waves, derived values, rebalancing rounds,
drain driving, transfer bookkeeping): this module only feeds it frames, the clock and the
API's commands, carries out the effects it returns (send, resolve a caller's future, save,
count, publish) and presents the results. It knows nothing of HTTP: failures are
`BalancerError`s, which the HTTP layer (`treewave.balancer.app`) maps to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from treewave.balancer.dialing import Dialers
from treewave.balancer.errors import (
    BalancerError,
    BalancerStateError,
    ServerNotConnected,
    ServerRetiring,
    SubmitUnconfirmed,
    UnknownServer,
)
from treewave.balancer.metrics import BalancerMetrics
from treewave.balancer.settings import BalancerSettings
from treewave.balancer.statefile import (
    STATE_FILE,
    restore_migration,
    save_migration,
)
from treewave.balancer.traces import WaveTraces, sampled_waves
from treewave.core.api import (
    ClusterStatus,
    Edge,
    MovedTasks,
    RebalanceResult,
    ServerLine,
    TopologyStatus,
    TopologySummary,
    TreeNode,
    TreeSnapshot,
    WaveSummary,
)
from treewave.core.balancer.effects import (
    DrainMoved,
    Effect,
    RemoteError,
    RoundFinished,
    SaveState,
    SendTo,
    ServerRetired,
    ShowMigration,
    SubmissionConfirmed,
    SubmissionTimedOut,
    TraceArrived,
    TransferFinished,
    TransferSettled,
    WaveFinished,
    WaveOutcome,
    WaveStarted,
)
from treewave.core.balancer.machine import BalancerMachine, CommandRefused
from treewave.core.errors import ProtocolError, StaleMessage
from treewave.core.load import expected_work_s, load_level, pressure
from treewave.core.messages import (
    DrainRequest,
    EchoExplore,
    EchoReply,
    ErrorReply,
    FinnSets,
    FinnWork,
    ServerState,
    TasksAccepted,
    parse_message,
)
from treewave.core.migration import Migration
from treewave.core.policy import expected_makespan, loads_of, max_pressure
from treewave.core.topology import Topology, TopologyFile
from treewave.wire.links import LinkSet
from treewave.wire.timers import DeadlineTimer

__all__ = [
    "HISTORY",
    "LIVE_HISTORY",
    "STATE_FILE",
    "Balancer",
    "BalancerError",
    "BalancerStateError",
    "ServerNotConnected",
    "ServerRetiring",
    "SubmitUnconfirmed",
    "UnknownServer",
    "WaveRecord",
    "rebalance_report",
    "tree_json",
]

log = logging.getLogger("treewave.balancer")

HISTORY = 20
"""Waves kept for the API and the page (the page's own refreshes apart)."""
LIVE_HISTORY = 10
"""The status page's own refresh Echoes kept (apart, so they do not crowd out the rest)."""


@dataclass
class WaveRecord:
    """One finished wave, for the API, the status page and the metrics."""

    wave_id: str
    algorithm: Literal["echo", "finn"]
    complete: bool
    missing: list[str]
    messages: int
    duration_s: float
    finished_at: float
    trigger: str = "api"
    """Who asked: "api", "rebalance" or "status" (the page's refreshes are kept apart, in
    `Balancer.live_history`, so they do not push real waves out of the history)."""
    states: tuple[ServerState, ...] = ()
    decided: tuple[str, ...] = ()

    def summary(self) -> WaveSummary:
        return WaveSummary(
            wave_id=self.wave_id,
            algorithm=self.algorithm,
            complete=self.complete,
            missing=self.missing,
            messages=self.messages,
            duration_s=round(self.duration_s, 6),
            finished_at=self.finished_at,
            trigger=self.trigger,
        )


class Balancer:
    """Everything the balancer does, behind the HTTP API and the status page."""

    def __init__(self, settings: BalancerSettings, topology: Topology) -> None:
        self.settings = settings
        self.state_path = None if settings.state_dir is None else settings.state_dir / STATE_FILE
        now, wall_now = time.monotonic(), time.time()
        # The saved desired topology and migration, then the file's topology adopted over
        # it: a balancer started with a topology that left servers out drains them.
        self.machine = BalancerMachine(
            self._restore(topology),
            settings.overrides(),
            secrets.token_hex(3),
            settings.step_timeout_s,
            now,
            wall_now,
        )
        _, self._startup = self.machine.adopt(topology, now, wall_now)
        self.metrics = BalancerMetrics(topology)
        self.metrics.show_policy(self.machine.policy.name)
        self.links = LinkSet()
        self.dialers = Dialers(settings, self.links, self.on_frame, self.on_link_up)
        """The link of every server linked to (the topology's and the retiring)."""
        self.topology_lock = asyncio.Lock()
        self.waves: dict[str, asyncio.Future[WaveRecord]] = {}
        """Callers waiting for a wave's record, by wave id."""
        self.rounds: dict[str, asyncio.Future[RoundFinished]] = {}
        """Callers waiting for a rebalancing round, by round id."""
        self.transfers: dict[str, asyncio.Future[int]] = {}
        """Callers waiting for a transfer's result, by transfer id."""
        self.submissions: dict[str, asyncio.Future[TasksAccepted | None]] = {}
        """Callers waiting for a server to confirm a submission, by its first task id."""
        self.history: deque[WaveRecord] = deque(maxlen=HISTORY)
        self.live_history: deque[WaveRecord] = deque(maxlen=LIVE_HISTORY)
        self.last_echo: WaveRecord | None = None
        self.last_moves: list[MovedTasks] = []
        self.last_rebalance_at: float | None = None
        self.timers = DeadlineTimer(self.machine.next_deadline, self._deadline_passed)
        """The machine's one timer; `moved()` after every step of the machine."""
        self.listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self.traces = WaveTraces(settings, topology, self.links, self.publish)
        self._save()
        self._show_migration()

    # --- what the machine derives (read by the API and the page) ----------------------------

    @property
    def topology(self) -> Topology:
        return self.machine.topology

    @property
    def names(self) -> frozenset[str]:
        return self.machine.names

    @property
    def migration(self) -> Migration:
        return self.machine.migration

    @property
    def wave_deadline_s(self) -> float:
        return self.machine.wave_deadline_s

    @property
    def rebalance_interval_s(self) -> float:
        return self.machine.rebalance_interval_s

    @property
    def linked_names(self) -> tuple[str, ...]:
        return self.machine.linked_names

    @property
    def in_doubt(self) -> tuple[str, ...]:
        """Transfers whose tasks a donor may still hold (the coordinator resolves them)."""
        return self.machine.coordinator.in_doubt

    # --- frames from servers ---------------------------------------------------------------

    async def on_frame(self, peer: str, text: str) -> None:
        try:
            msg = parse_message(text)
            effects = self.machine.receive(peer, msg, time.monotonic(), time.time())
            if isinstance(msg, (EchoExplore, EchoReply, FinnSets)):
                self.traces.received(peer, msg)
        except StaleMessage as exc:
            self.metrics.invalid.labels(exc.reason).inc()
            log.debug("%s", exc)
            return
        except ProtocolError as exc:
            self.metrics.invalid.labels(exc.reason).inc()
            log.warning("rejected a frame from %s: %s", peer, exc)
            await self.links.send(peer, ErrorReply(error=str(exc)[:2000]))
            return
        await self._carry_out(effects)

    async def on_link_up(self, name: str) -> None:
        """A server (re)connected: the machine asks for lost reservations, starts moves."""
        await self._carry_out(self.machine.link_up(name, time.monotonic()))

    async def _deadline_passed(self, now: float) -> None:
        await self._carry_out(self.machine.handle_timer(now, time.time()))
        await asyncio.sleep(0)  # never starve the loop, whatever the machine returned

    # --- effects ------------------------------------------------------------------------------

    async def _carry_out(self, effects: list[Effect]) -> None:
        """Do what the machine asks; a send that cannot go out goes back to it."""
        work = deque(effects)
        while work:
            e = work.popleft()
            if isinstance(e, SendTo):
                if isinstance(e.message, DrainRequest) and e.message.requeue_running:
                    log.info("%s: drain grace over; requeueing its running tasks", e.to)
                if not await self.links.send(e.to, e.message):
                    work += self.machine.send_failed(e.to, e.message, time.monotonic())
            elif isinstance(e, WaveStarted):
                self.traces.started(e.initiator, list(e.sends))
            elif isinstance(e, WaveFinished):
                self._wave_finished(e.outcome)
            elif isinstance(e, RoundFinished):
                self._round_finished(e)
            elif isinstance(e, TransferFinished):
                if e.outcome == "in_doubt":
                    log.warning("transfer %s is in doubt; resolving", e.transfer)
                _resolve(self.transfers.get(e.transfer), e.moved)
            elif isinstance(e, TransferSettled):
                self.metrics.transfers.labels(e.outcome).inc()
            elif isinstance(e, DrainMoved):
                self.metrics.drain_moved.inc(e.moved)
                self.metrics.tasks_moved.inc(e.moved)
            elif isinstance(e, SubmissionConfirmed):
                _resolve(self.submissions.get(e.first), e.accepted)
            elif isinstance(e, SubmissionTimedOut):
                _resolve(self.submissions.get(e.first), None)
            elif isinstance(e, SaveState):
                self._save()
                self._show_migration()
            elif isinstance(e, ShowMigration):
                self._show_migration()
            elif isinstance(e, ServerRetired):
                self._retired(e.server)
            elif isinstance(e, TraceArrived):
                self.traces.on_part(e.peer, e.part)
            elif isinstance(e, RemoteError):
                log.warning("%s reported an error: %s", e.peer, e.error)
        self.metrics.in_doubt.set(len(self.in_doubt))
        self.timers.moved()

    def _wave_finished(self, outcome: WaveOutcome) -> None:
        record = WaveRecord(
            wave_id=outcome.wave_id,
            algorithm=outcome.algorithm,
            complete=outcome.complete,
            missing=list(outcome.missing),
            messages=outcome.messages,
            duration_s=outcome.duration_s,
            finished_at=time.time(),
            trigger=outcome.trigger,
            states=outcome.states,
            decided=outcome.decided,
        )
        self._record(record, sampled=outcome.periodic)
        if record.algorithm == "echo" and record.states:
            self.last_echo = record
            self.metrics.show_snapshot(record.states, self.topology.settings.task_time_s)
        _resolve(self.waves.get(record.wave_id), record)

    def _record(self, record: WaveRecord, sampled: bool = False) -> None:
        outcome = "complete" if record.complete else "partial"
        self.metrics.waves.labels(record.algorithm, outcome).inc()
        self.metrics.wave_duration.labels(record.algorithm).observe(record.duration_s)
        self.metrics.wave_messages.labels(record.algorithm).inc(record.messages)
        (self.live_history if record.trigger == "status" else self.history).appendleft(record)
        if sampled:
            with sampled_waves():  # periodic rounds' waves are traced by sample only
                self.traces.finished(record)
        else:
            self.traces.finished(record)
        if not record.complete:
            log.warning(
                "%s wave %s partial, missing %s", record.algorithm, record.wave_id, record.missing
            )
        self.publish({"event": "wave", "wave": record.summary().model_dump(mode="json")})

    def _round_finished(self, done: RoundFinished) -> None:
        self.metrics.rebalance_runs.inc()
        self.metrics.rebalance_moves.inc(len(done.planned))
        self.metrics.tasks_moved.inc(sum(done.moved))
        moves = moves_done(done)
        if moves:
            self.last_moves = moves
            self.last_rebalance_at = time.time()
            self.publish({"event": "moves", "moves": [m.model_dump(mode="json") for m in moves]})
        _resolve(self.rounds.get(done.round_id), done)

    async def _await(
        self, table: dict[str, asyncio.Future[Any]], key: str, effects: list[Effect]
    ) -> Any:
        """Register a caller for `key`, carry out `effects`, wait for the answer."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        table[key] = fut
        try:
            await self._carry_out(effects)
            return await fut
        finally:
            table.pop(key, None)

    # --- waves ---------------------------------------------------------------------------------

    async def run_echo(self, trigger: str = "api") -> WaveRecord:
        wave, effects = self.machine.start_echo(trigger, time.monotonic())
        record: WaveRecord = await self._await(self.waves, wave, effects)
        return record

    async def run_finn(self, work: FinnWork) -> WaveRecord:
        wave, effects = self.machine.start_finn(work, time.monotonic(), time.time())
        record: WaveRecord = await self._await(self.waves, wave, effects)
        return record

    # --- transfers -------------------------------------------------------------------------

    async def transfer(
        self, source: str, target: str, count: int, durations: tuple[float, ...] | None = None
    ) -> int:
        """Move up to `count` queued tasks (of about these `durations`, if given) from
        `source` to `target`, two-phase; returns how many moved. On any failure the tasks
        stay with (or go back to) the donor, or stay reserved at the donor, in doubt, until
        the coordinator learns which way it went (it keeps at it after this returns)."""
        tid, effects = self.machine.start_transfer(
            source, target, count, time.monotonic(), durations
        )
        moved: int = await self._await(self.transfers, tid, effects)
        return moved

    # --- rebalancing ---------------------------------------------------------------------------

    async def rebalance(self) -> RebalanceResult:
        """One round (Echo, the policy's plan, its transfers, Echo after), after any
        round already running."""
        round_id, effects = self.machine.start_rebalance(time.monotonic())
        done: RoundFinished = await self._await(self.rounds, round_id, effects)
        return rebalance_report(done, self.topology.settings.task_time_s)

    # --- tasks -------------------------------------------------------------------------------

    async def submit(
        self, node: str, count: int, duration_s: float | None, actual_s: float | None = None
    ) -> list[str]:
        """Queue `count` new tasks at `node`; answered only once the server confirms they
        are queued and on disk (a server dying with the submission unread must not leave
        them acknowledged). Raises `UnknownServer`, `ServerNotConnected` (nothing queued)
        or `SubmitUnconfirmed` (maybe queued)."""
        try:
            ids, effects = self.machine.submit(node, count, duration_s, actual_s, time.monotonic())
        except CommandRefused as exc:
            raise (ServerRetiring if exc.reason == "retiring" else UnknownServer)(node) from None
        confirmed: asyncio.Future[TasksAccepted | None] = asyncio.get_running_loop().create_future()
        self.submissions[ids[0]] = confirmed
        try:
            for e in effects:
                assert isinstance(e, SendTo)
                if not await self.links.send(e.to, e.message):
                    self.machine.forget_submission(ids[0])
                    raise ServerNotConnected(node)
            self.timers.moved()
            if await confirmed is None:
                raise SubmitUnconfirmed(node, ids[0], ids[-1])
        finally:
            self.submissions.pop(ids[0], None)
        return ids

    # --- running ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Links to every server and the machine's timer, while inside."""
        self.dialers.open()
        tasks = [
            asyncio.create_task(self.timers.run(), name="balancer-timers"),
            asyncio.create_task(self.links.keep_alive(), name="balancer-keep-alive"),
        ]
        self._sync_links()
        startup, self._startup = self._startup, []
        await self._carry_out(startup)
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for table in (self.waves, self.rounds, self.transfers, self.submissions):
                for waiter in table.values():
                    if not waiter.done():
                        waiter.cancel()
            await self.dialers.close()

    # --- topology changes ------------------------------------------------------------------------

    def topology_status(self) -> TopologyStatus:
        """`GET /api/topology`: the adopted topology and the migration's state."""
        return TopologyStatus(
            topology=TopologyFile(settings=self.topology.settings, servers=self.topology.servers),
            migration=self.migration.status(time.time()),
        )

    async def adopt(self, desired: Topology) -> bool:
        """Make `desired` the topology (validated by the caller) and start, or supersede,
        the migration to it; False when it is the current topology (nothing changes)."""
        async with self.topology_lock:
            if desired.to_json_data() == self.topology.to_json_data():
                return False
            self.dialers.reread_peers()
            _, effects = self.machine.adopt(desired, time.monotonic(), time.time())
            self.traces.topology = desired
            self.metrics.show_topology(desired)
            self.metrics.show_policy(self.machine.policy.name)
            self._sync_links()
            self.metrics.topology_changes.inc()
            log.info(
                "adopted a topology of %d servers (policy %s, wave deadline %.3g s, "
                "rebalance interval %g s); retiring: %s",
                len(desired),
                self.machine.policy.name,
                self.wave_deadline_s,
                self.rebalance_interval_s,
                ", ".join(sorted(self.migration.retiring)) or "none",
            )
            self.publish(
                {
                    "event": "topology",
                    "migration": self.migration.status(time.time()).model_dump(mode="json"),
                }
            )
        await self._carry_out(effects)
        return True

    def _sync_links(self) -> None:
        self.dialers.sync(self.linked_names)

    def _retired(self, name: str) -> None:
        """It holds nothing (the machine dropped it): drop its link too."""
        self._sync_links()
        self.metrics.retired.inc()
        log.info("server %s retired: it holds nothing and may be stopped", name)
        self.publish({"event": "retired", "server": name})

    def _show_migration(self) -> None:
        status = self.migration.status(time.time())
        self.metrics.show_migration(status)

    # --- persistence ------------------------------------------------------------------------

    def _restore(self, topology: Topology) -> Migration:
        return restore_migration(self.state_path, topology, self.settings.probe_interval_s)

    def _save(self) -> None:
        """Write the desired topology and the migration (when a state directory is set)."""
        save_migration(self.state_path, self.migration)

    # --- live updates ----------------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        for q in list(self.listeners):
            if q.qsize() < 100:
                q.put_nowait(event)

    def subscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Receive every wave and move event on `queue` (bounded: a slow reader misses some)."""
        self.listeners.add(queue)

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.listeners.discard(queue)

    def wave_list(self, include_live: bool = False) -> list[WaveSummary]:
        """Recent waves, newest first; with `include_live`, the status page's own refresh
        Echoes too (their `trigger` is "status")."""
        if not include_live:
            return [w.summary() for w in self.history]
        merged = [*self.history, *self.live_history]
        merged.sort(key=lambda w: w.finished_at, reverse=True)
        return [w.summary() for w in merged]

    def status(self, include_live: bool = False) -> ClusterStatus:
        """The API's `/api/status` (and, with the page's own waves, the page's snapshot)."""
        echo = self.last_echo
        return ClusterStatus(
            topology=TopologySummary(
                root=self.topology.root,
                servers=[
                    ServerLine(name=s.name, cpus=s.cpus, children=list(s.children))
                    for s in self.topology.servers
                ],
                edges=[Edge(source=a, target=b) for a, b in self.topology.edges],
                overload_percent=self.topology.settings.overload_percent,
                task_time_s=self.topology.settings.task_time_s,
            ),
            links={n: self.links.connected(n) for n in self.linked_names},
            snapshot=None if echo is None else tree_json(echo, self.topology),
            waves=self.wave_list(include_live),
            moves=self.last_moves,
            last_rebalance_at=self.last_rebalance_at,
            rebalance_interval_s=self.rebalance_interval_s,
            wave_deadline_s=round(self.wave_deadline_s, 3),
            policy=self.machine.policy.name,
            in_doubt=len(self.in_doubt),
            migration=self.migration.status(time.time()),
        )


def tree_json(record: WaveRecord, topology: Topology) -> TreeSnapshot:
    """A snapshot for the API and the status page; `pressure` (expected work per CPU,
    seconds) and `level` (the colour band) come from `core.load`, so no client computes
    them."""
    task_time_s = topology.settings.task_time_s
    overload_percent = topology.settings.overload_percent
    return TreeSnapshot(
        **dict(record.summary()),
        nodes=[
            TreeNode(
                name=s.name,
                cpus=s.cpus,
                running=s.running,
                queued=s.queued,
                completed=s.completed,
                reserved=s.reserved,
                expected_work_s=round(expected_work_s(s, task_time_s), 6),
                pressure=round(pressure(s, task_time_s), 6),
                level=load_level(s.running, s.queued, s.cpus, overload_percent),
                echo_parent=s.echo_parent,
            )
            # (a snapshot taken before a topology change may name servers that left)
            for s in sorted(
                (s for s in record.states if s.name in topology),
                key=lambda s: topology.names.index(s.name),
            )
        ],
        edges=[Edge(source=a, target=b) for a, b in topology.edges],
    )


T = TypeVar("T")


def _resolve(waiter: asyncio.Future[T] | None, value: T) -> None:
    """Answer a waiting caller, if it still waits."""
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


def moves_done(done: RoundFinished) -> list[MovedTasks]:
    """The round's moves that moved something, for the page and the event stream."""
    return [
        MovedTasks(source=m.source, target=m.target, tasks=n)
        for m, n in zip(done.planned, done.moved, strict=True)
        if n > 0
    ]


def rebalance_report(done: RoundFinished, task_time_s: float) -> RebalanceResult:
    """`POST /api/rebalance`'s answer: what moved, what was planned, before and after."""
    before, after = done.before, done.after
    loads = loads_of(before.states, task_time_s)
    after_loads = loads_of(after.states, task_time_s)
    return RebalanceResult(
        moves=moves_done(done),
        planned=[MovedTasks(source=m.source, target=m.target, tasks=m.tasks) for m in done.planned],
        max_pressure_before=round(max_pressure(loads), 6),
        max_pressure_after=round(max_pressure(after_loads), 6),
        expected_makespan_before_s=round(expected_makespan(loads), 6),
        expected_makespan_after_s=round(expected_makespan(after_loads), 6),
        complete=before.complete and after.complete,
        missing=sorted(set(before.missing) | set(after.missing)),
    )
