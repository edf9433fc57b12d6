"""The balancer's domain: waves, the policy, the transfer coordinator, periodic rebalancing.

It keeps one WebSocket link to every server. Waves are driven by the core's initiators
(`EchoInitiator`, `FinnInitiator`) and transfers by the core's `TransferCoordinator`; this
module only sends what they return, feeds them the replies and the clock, and turns their
decisions into results and metrics. It knows nothing of HTTP: failures are `BalancerError`s,
which the HTTP layer (`treewave.balancer.app`) maps to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from treewave.balancer.metrics import BalancerMetrics
from treewave.balancer.settings import BalancerSettings
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
from treewave.core.deadlines import wave_deadline_s
from treewave.core.echo import EchoInitiator
from treewave.core.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StaleMessage,
)
from treewave.core.events import EchoResult, FinnResult, Send
from treewave.core.finn import FinnInitiator
from treewave.core.ledger import TRANSFER_REPLIES
from treewave.core.load import expected_work_s, load_level, pressure
from treewave.core.messages import (
    DrainReport,
    DrainRequest,
    EchoExplore,
    EchoReply,
    ErrorReply,
    FinnSets,
    FinnWork,
    Message,
    ServerState,
    SubmitTasks,
    Task,
    TasksAccepted,
    TracePart,
    parse_message,
)
from treewave.core.migration import (
    HoldServer,
    Intent,
    Migration,
    MigrationPhase,
    MoveQueued,
    ReleaseServer,
    RequeueRunning,
    Retired,
    ServerReport,
    TargetLoads,
)
from treewave.core.migration import TransferDone as MoveDone
from treewave.core.policy import (
    Move,
    expected_makespan,
    imbalance,
    loads_of,
    max_pressure,
    plan_moves,
)
from treewave.core.topology import BALANCER, Topology, TopologyFile
from treewave.core.transfer import (
    TransferCoordinator,
    TransferDone,
    TransferOutput,
    TransferResult,
    TransferSend,
)
from treewave.wire.addressing import peer_url
from treewave.wire.atomicfile import write_atomic
from treewave.wire.links import LinkSet, dial_forever
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
    "tree_json",
]

log = logging.getLogger("treewave.balancer")

HISTORY = 20
"""Waves kept for the API and the page (the page's own refreshes apart)."""
LIVE_HISTORY = 10
"""The status page's own refresh Echoes kept (apart, so they do not crowd out the rest)."""
RETRY_S = 1.0
"""How soon an unanswered transfer resolution step is sent again."""
LINK_WAIT_S = 5.0
"""How long a drain move waits for its servers' links (an added server is still dialled)."""
STATE_FILE = "balancer-topology.json"
"""The desired topology and the migration, in the balancer's state directory."""


class BalancerError(Exception):
    """A request the balancer could not carry out; nothing changed unless said."""


class UnknownServer(BalancerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown server {name!r}")
        self.name = name


class ServerRetiring(BalancerError):
    """The server is leaving the topology: it takes no new work."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"server {name!r} is retiring (not in the current topology); it takes no new "
            "tasks, nothing was queued"
        )
        self.name = name


class BalancerStateError(BalancerError, ValueError):
    """The saved topology and migration cannot be read: starting without them could strand
    the tasks of servers still draining, so the balancer does not start."""


class ServerNotConnected(BalancerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"server {name!r} is not connected; nothing was queued")
        self.name = name


class SubmitUnconfirmed(BalancerError):
    """The server did not confirm a submission in time: the tasks may or may not be queued."""

    def __init__(self, name: str, first_task: str, last_task: str) -> None:
        super().__init__(
            f"server {name!r} did not confirm the tasks; they may or may not be queued there"
        )
        self.name = name
        self.first_task = first_task
        self.last_task = last_task


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


@dataclass
class PendingWave:
    initiator: EchoInitiator | FinnInitiator
    done: asyncio.Future[EchoResult | FinnResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Balancer:
    """Everything the balancer does, behind the HTTP API and the status page."""

    def __init__(self, settings: BalancerSettings, topology: Topology) -> None:
        self.settings = settings
        self.peer_urls = dict(settings.peer_urls)
        self.state_path = None if settings.state_dir is None else settings.state_dir / STATE_FILE
        # The saved desired topology and migration, then the file's topology adopted over
        # it: a balancer started with a topology that left servers out drains them.
        self.migration = self._restore(topology)
        self._startup_intents = self.migration.adopt(topology, time.time())
        self.topology = topology
        self.names = frozenset(topology.names)
        self.wave_timeout_s = settings.wave_timeout_s or topology.settings.wave_timeout_s
        self.wave_deadline_s = wave_deadline_s(
            self.wave_timeout_s, topology.depth, len(topology.servers)
        )
        """Every wave's deadline: the setting, grown with the tree's depth and size."""
        interval = settings.rebalance_interval_s
        self.rebalance_interval_s = (
            topology.settings.rebalance_interval_s if interval is None else interval
        )
        self.metrics = BalancerMetrics(topology)
        self.links = LinkSet()
        self.waves: dict[str, PendingWave] = {}
        self._instance = secrets.token_hex(3)
        self.coordinator = TransferCoordinator(
            self.linked_names, self._instance, settings.step_timeout_s, RETRY_S
        )
        self.dialers: dict[str, asyncio.Task[None]] = {}
        """The link task of every server linked to (the topology's and the retiring)."""
        self.session: aiohttp.ClientSession | None = None
        self.drain_moves: set[asyncio.Task[None]] = set()
        self.pending_moves: Counter[str] = Counter()
        """Drain moves not started yet, by source and target (they count as unsettled)."""
        self.link_changed = asyncio.Condition()
        """Notified when a link comes up (drain moves wait for theirs)."""
        self.topology_lock = asyncio.Lock()
        self.transfers: dict[str, asyncio.Future[int]] = {}
        """Callers waiting for a transfer's result, by transfer id."""
        self.submissions: dict[str, asyncio.Future[TasksAccepted]] = {}
        """Callers waiting for a server to confirm a submission, by its first task id."""
        self.history: deque[WaveRecord] = deque(maxlen=HISTORY)
        self.live_history: deque[WaveRecord] = deque(maxlen=LIVE_HISTORY)
        self.last_echo: WaveRecord | None = None
        self.last_moves: list[MovedTasks] = []
        self.last_rebalance_at: float | None = None
        self.rebalance_lock = asyncio.Lock()
        self.timers = DeadlineTimer(self._next_deadline, self._deadline_passed)
        """The waves' deadlines and the transfers' timeouts and retries; `moved()` when a
        wave or a transfer step starts."""
        self.rebalance_soon = asyncio.Event()
        """Set when new work arrives: the periodic loop rebalances at once, not at the next
        tick (only when periodic rebalancing is on)."""
        self.listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self._ids = itertools.count(1)
        self.traces = WaveTraces(settings, topology, self.links, self.publish)
        self._save()
        self._show_migration()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self._instance}-{next(self._ids)}"

    @property
    def in_doubt(self) -> tuple[str, ...]:
        """Transfers whose tasks a donor may still hold (the coordinator resolves them)."""
        return self.coordinator.in_doubt

    # --- frames from servers ---------------------------------------------------------------

    async def on_frame(self, peer: str, text: str) -> None:
        intents: list[Intent] = []
        out: list[TransferOutput] = []
        try:
            msg = parse_message(text)
            if isinstance(msg, DrainReport):
                intents = self.on_drain_report(peer, msg)
            else:
                out = self.handle(peer, msg)
        except StaleMessage as exc:
            self.metrics.invalid.labels(exc.reason).inc()
            log.debug("%s", exc)
            return
        except ProtocolError as exc:
            self.metrics.invalid.labels(exc.reason).inc()
            log.warning("rejected a frame from %s: %s", peer, exc)
            await self.links.send(peer, ErrorReply(error=str(exc)[:2000]))
            return
        await self._apply(out)
        await self.carry_out(intents)

    def handle(self, peer: str, msg: Message) -> list[TransferOutput]:
        """Apply one validated frame; returns what the transfer coordinator wants sent."""
        if isinstance(msg, (EchoExplore, EchoReply, FinnSets)):
            self._wave_message(peer, msg)
            return []
        if isinstance(msg, TracePart):
            self.traces.on_part(peer, msg)
            return []
        if isinstance(msg, TRANSFER_REPLIES):
            return self.coordinator.receive(msg, time.monotonic(), peer)
        if isinstance(msg, TasksAccepted):
            fut = self.submissions.get(msg.first)
            if fut is None or fut.done():
                raise StaleMessage(f"unexpected {msg.type} for {msg.first}")
            fut.set_result(msg)
            return []
        if isinstance(msg, ErrorReply):
            log.warning("%s reported an error: %s", peer, msg.error)
            return []
        raise RemoteProtocolError(f"{msg.type} is not something servers send", "unexpected_type")

    def _wave_message(self, peer: str, msg: EchoExplore | EchoReply | FinnSets) -> None:
        if msg.sender != peer:
            raise RemoteProtocolError(
                f"{peer!r} sent a message claiming to be from {msg.sender!r}",
                reason="sender_mismatch",
            )
        pending = self.waves.get(msg.wave)
        if pending is None:
            raise StaleMessage(f"wave {msg.wave} is not in flight")
        init = pending.initiator
        now = time.monotonic()
        result: EchoResult | FinnResult | None
        if isinstance(init, EchoInitiator):
            if isinstance(msg, FinnSets):
                raise RemoteProtocolError("finn message in an echo wave", "wrong_algorithm")
            result = init.receive(msg, now)
        else:
            if not isinstance(msg, FinnSets):
                raise RemoteProtocolError("echo message in a finn wave", "wrong_algorithm")
            result = init.receive(msg, now)
        self.traces.received(peer, msg)
        if result is not None and not pending.done.done():
            pending.done.set_result(result)

    # --- waves ---------------------------------------------------------------------------------

    async def run_echo(self, trigger: str = "api") -> WaveRecord:
        wave = self.new_id("echo")
        init = EchoInitiator(wave, self.topology.root, self.names)
        started = time.monotonic()
        # Deadlines step down per hop; a quarter of the budget per (depth + 2) hops leaves
        # room for spanning-tree paths longer than the topology's depth.
        hop_s = self.wave_deadline_s / (4 * (self.topology.depth + 2))
        sends = init.start(started, self.wave_deadline_s, hop_s)
        result = await self._run_wave(wave, init, sends)
        assert isinstance(result, EchoResult)
        got = {s.name for s in result.states}
        record = WaveRecord(
            wave_id=wave,
            algorithm="echo",
            complete=result.complete,
            missing=sorted(self.names - got),
            messages=result.messages,
            duration_s=time.monotonic() - started,
            finished_at=time.time(),
            states=result.states,
            trigger=trigger,
        )
        self._record(record)
        if result.states:
            self.last_echo = record
            task_time_s = self.topology.settings.task_time_s
            loads = loads_of(result.states, task_time_s)
            if self.migration.phase is MigrationPhase.DRAINING:
                # Drained tasks go where the new topology has least pressure.
                self.migration.receive(TargetLoads(tuple(loads)), time.time())
            self.metrics.max_pressure.set(max_pressure(loads))
            self.metrics.imbalance.set(imbalance(loads))
            self.metrics.expected_makespan.set(expected_makespan(loads))
            for s in result.states:
                self.metrics.server_pressure.labels(s.name).set(pressure(s, task_time_s))
        return record

    async def run_finn(self, work: FinnWork) -> WaveRecord:
        wave = self.new_id("finn")
        init = FinnInitiator(wave, self.topology.root, self.topology.leaves, self.names, work)
        started = time.monotonic()
        expires_at = time.time() + self.wave_deadline_s
        sends = init.start(started, self.wave_deadline_s, expires_at)
        result = await self._run_wave(wave, init, sends)
        assert isinstance(result, FinnResult)
        record = WaveRecord(
            wave_id=wave,
            algorithm="finn",
            complete=result.complete,
            missing=sorted(self.names - set(result.decided)),
            messages=result.messages,
            duration_s=time.monotonic() - started,
            finished_at=time.time(),
            decided=result.decided,
        )
        self._record(record)
        return record

    async def _run_wave(
        self, wave: str, init: EchoInitiator | FinnInitiator, sends: list[Send]
    ) -> EchoResult | FinnResult:
        pending = PendingWave(init)
        self.waves[wave] = pending
        self.timers.moved()
        self.traces.started(init, sends)
        try:
            for send in sends:
                if not await self.links.send(send.to, send.message):
                    # The root is unreachable: nothing can answer, so end at once.
                    result = init.handle_timer(float("inf"))
                    if result is not None and not pending.done.done():
                        pending.done.set_result(result)
            return await pending.done
        finally:
            del self.waves[wave]

    def _record(self, record: WaveRecord) -> None:
        outcome = "complete" if record.complete else "partial"
        self.metrics.waves.labels(record.algorithm, outcome).inc()
        self.metrics.wave_duration.labels(record.algorithm).observe(record.duration_s)
        self.metrics.wave_messages.labels(record.algorithm).inc(record.messages)
        (self.live_history if record.trigger == "status" else self.history).appendleft(record)
        self.traces.finished(record)
        if not record.complete:
            log.warning(
                "%s wave %s partial, missing %s", record.algorithm, record.wave_id, record.missing
            )
        self.publish({"event": "wave", "wave": record.summary().model_dump(mode="json")})

    async def _deadline_passed(self, now: float) -> None:
        """Decide waves past their deadline; time out or retry transfer steps."""
        for pending in list(self.waves.values()):
            result = pending.initiator.handle_timer(now)
            if result is not None and not pending.done.done():
                pending.done.set_result(result)
        await self._apply(self.coordinator.handle_timer(now))

    def _next_deadline(self) -> float | None:
        deadlines = [p.initiator.deadline for p in self.waves.values() if not p.done.done()]
        transfers = self.coordinator.next_deadline()
        if transfers is not None:
            deadlines.append(transfers)
        return min(deadlines, default=None)

    # --- transfers -------------------------------------------------------------------------

    async def transfer(
        self, source: str, target: str, count: int, durations: tuple[float, ...] | None = None
    ) -> int:
        """Move up to `count` queued tasks (of about these `durations`, if given) from
        `source` to `target`, two-phase; returns how many moved. On any failure the tasks
        stay with (or go back to) the donor, or stay reserved at the donor, in doubt, until
        the coordinator learns which way it went (it keeps at it after this returns)."""
        tid, done, out = self._start_transfer(source, target, count, durations)
        return await self._finish_transfer(tid, done, out)

    def _start_transfer(
        self, source: str, target: str, count: int, durations: tuple[float, ...] | None = None
    ) -> tuple[str, asyncio.Future[int], list[TransferOutput]]:
        """Register a transfer with the coordinator at once (so it counts as unsettled for
        both servers from now on); its first request is in the outputs."""
        tid, out = self.coordinator.start(source, target, count, time.monotonic(), durations)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transfers[tid] = done
        return tid, done, out

    async def _finish_transfer(
        self, tid: str, done: asyncio.Future[int], out: list[TransferOutput]
    ) -> int:
        try:
            await self._apply(out)
            return await done
        finally:
            self.transfers.pop(tid, None)

    async def _apply(self, outputs: list[TransferOutput]) -> None:
        """Send what the coordinator asks for and hand its results to their callers."""
        work = list(outputs)
        while work:
            item = work.pop(0)
            if isinstance(item, TransferSend):
                if not await self.links.send(item.to, item.message):
                    work += self.coordinator.unreachable(item.to, time.monotonic())
            elif isinstance(item, TransferResult):
                if item.outcome == "in_doubt":
                    log.warning("transfer %s is in doubt; resolving", item.transfer)
                waiter = self.transfers.get(item.transfer)
                if waiter is not None and not waiter.done():
                    waiter.set_result(item.moved)
            elif isinstance(item, TransferDone):
                self.metrics.transfers.labels(item.outcome).inc()
        self.metrics.in_doubt.set(len(self.coordinator.in_doubt))
        self.timers.moved()

    async def on_link_up(self, name: str) -> None:
        """A server (re)connected: ask for reservations we may have lost track of."""
        async with self.link_changed:
            self.link_changed.notify_all()
        await self._apply(self.coordinator.link_up(name, time.monotonic()))

    # --- rebalancing ---------------------------------------------------------------------------

    async def rebalance(self) -> RebalanceResult:
        async with self.rebalance_lock:
            before = await self.run_echo("rebalance")
            task_time_s = self.topology.settings.task_time_s
            loads = loads_of(before.states, task_time_s)
            moves = plan_moves(loads)
            self.metrics.rebalance_runs.inc()
            self.metrics.rebalance_moves.inc(len(moves))
            moved = await asyncio.gather(*(self._move(m) for m in moves))
            after = await self.run_echo("rebalance") if moves else before
            done = [
                MovedTasks(source=m.source, target=m.target, tasks=n)
                for m, n in zip(moves, moved, strict=True)
                if n > 0
            ]
            self.metrics.tasks_moved.inc(sum(moved))
            if done:
                self.last_moves = done
                self.last_rebalance_at = time.time()
                self.publish({"event": "moves", "moves": [m.model_dump(mode="json") for m in done]})
            return RebalanceResult(
                moves=done,
                planned=[
                    MovedTasks(source=m.source, target=m.target, tasks=m.tasks) for m in moves
                ],
                max_pressure_before=round(max_pressure(loads), 6),
                max_pressure_after=round(max_pressure(loads_of(after.states, task_time_s)), 6),
                expected_makespan_before_s=round(expected_makespan(loads), 6),
                expected_makespan_after_s=round(
                    expected_makespan(loads_of(after.states, task_time_s)), 6
                ),
                complete=before.complete and after.complete,
                missing=sorted(set(before.missing) | set(after.missing)),
            )

    async def _move(self, move: Move) -> int:
        return await self.transfer(move.source, move.target, move.tasks, move.durations)

    async def run_periodic_rebalance(self) -> None:
        if self.rebalance_interval_s <= 0:
            return
        while True:
            # Every interval, or as soon as tasks are submitted (which is when a skewed
            # arrival most needs spreading); a submission during a round triggers another.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rebalance_soon.wait(), self.rebalance_interval_s)
            self.rebalance_soon.clear()
            try:
                with sampled_waves():
                    await self.rebalance()
            except Exception:  # pragma: no cover - a round must never stop the loop
                log.exception("periodic rebalance failed")

    # --- tasks -------------------------------------------------------------------------------

    async def submit(
        self, node: str, count: int, duration_s: float | None, actual_s: float | None = None
    ) -> list[str]:
        """Queue `count` new tasks at `node`; answered only once the server confirms they
        are queued and on disk (a server dying with the submission unread must not leave
        them acknowledged). Raises `UnknownServer`, `ServerNotConnected` (nothing queued)
        or `SubmitUnconfirmed` (maybe queued)."""
        if node in self.migration.retiring:
            raise ServerRetiring(node)
        if node not in self.names:
            raise UnknownServer(node)
        duration = duration_s or self.topology.settings.task_time_s
        batch = self.new_id("t")
        tasks = tuple(
            Task(id=f"{batch}.{i}", duration_s=duration, actual_s=actual_s) for i in range(count)
        )
        confirmed: asyncio.Future[TasksAccepted] = asyncio.get_running_loop().create_future()
        self.submissions[tasks[0].id] = confirmed
        try:
            if not await self.links.send(node, SubmitTasks(tasks=tasks)):
                raise ServerNotConnected(node)
            try:
                await asyncio.wait_for(confirmed, self.settings.step_timeout_s)
            except TimeoutError:
                raise SubmitUnconfirmed(node, tasks[0].id, tasks[-1].id) from None
        finally:
            self.submissions.pop(tasks[0].id, None)
        self.rebalance_soon.set()
        return [t.id for t in tasks]

    # --- running ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Links to every server, the timers and periodic rebalancing, while inside."""
        # No connection limit: every open link holds one of the session's connections, and
        # aiohttp's default of 100 left a 300-server balancer with 100 links (Finn partial).
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        tasks = [
            asyncio.create_task(self.timers.run(), name="balancer-timers"),
            asyncio.create_task(self.links.keep_alive(), name="balancer-keep-alive"),
            asyncio.create_task(self.run_periodic_rebalance(), name="balancer-rebalance"),
            asyncio.create_task(self.run_migration(), name="balancer-migration"),
        ]
        self._sync_links()
        startup, self._startup_intents = self._startup_intents, []
        await self.carry_out(startup)
        try:
            yield
        finally:
            tasks += [*self.dialers.values(), *self.drain_moves]
            self.dialers.clear()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for pending in self.waves.values():
                if not pending.done.done():
                    pending.done.cancel()
            for waiter in self.transfers.values():
                if not waiter.done():
                    waiter.cancel()
            await self.links.close_all()
            await self.session.close()
            self.session = None

    # --- topology changes ------------------------------------------------------------------------

    @property
    def linked_names(self) -> tuple[str, ...]:
        """Every server the balancer keeps a link to: the topology's, and those retiring or
        being released (they still hold tasks, or must be told to take work again)."""
        extra = (self.migration.retiring | self.migration.releasing) - self.names
        return (*self.topology.names, *sorted(extra))

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
            self._reread_peers()
            intents = self.migration.adopt(desired, time.time())
            self._use_topology(desired)
            self._save()
            self.metrics.topology_changes.inc()
            self._show_migration()
            log.info(
                "adopted a topology of %d servers; retiring: %s",
                len(desired),
                ", ".join(sorted(self.migration.retiring)) or "none",
            )
            self.publish(
                {
                    "event": "topology",
                    "migration": self.migration.status(time.time()).model_dump(mode="json"),
                }
            )
        await self.carry_out(intents)
        return True

    def _reread_peers(self) -> None:
        """Local mode writes the added servers' URLs into the peers file before posting."""
        path = self.settings.peers_file
        if path is None:
            return
        try:
            peers = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("cannot read the peers file %s again (%s); keeping the old one", path, exc)
            return
        if isinstance(peers, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in peers.items()
        ):
            self.peer_urls = peers
        else:
            log.warning("the peers file %s does not map names to URLs; keeping the old one", path)

    def _use_topology(self, topology: Topology) -> None:
        self.topology = topology
        self.names = frozenset(topology.names)
        self.wave_timeout_s = self.settings.wave_timeout_s or topology.settings.wave_timeout_s
        self.traces.topology = topology
        self.metrics.show_topology(topology)
        self.coordinator.set_servers(self.linked_names)
        self._sync_links()

    def _sync_links(self) -> None:
        """Dial every server newly linked to; drop the links to those no longer linked."""
        if self.session is None:
            return
        wanted = set(self.linked_names)
        for name in sorted(set(self.dialers) - wanted):
            self.dialers.pop(name).cancel()
            log.info("link to %s dropped (retired)", name)
        for name in self.linked_names:
            if name in self.dialers:
                continue
            url = peer_url(name, self.settings.peer_url_template, self.peer_urls)
            self.dialers[name] = asyncio.create_task(
                dial_forever(
                    self.session,
                    name,
                    url,
                    BALANCER,
                    self.settings.secret,
                    self.links,
                    self.on_frame,
                    self.on_link_up,
                ),
                name=f"balancer-link-{name}",
            )

    def on_drain_report(self, peer: str, msg: DrainReport) -> list[Intent]:
        """A server's answer to a `DrainRequest`, with the transfers it is part of that are
        not settled yet (it must not retire while any is)."""
        report = ServerReport(
            server=peer,
            held=msg.held,
            queued=msg.queued,
            running=msg.running,
            reserved=msg.reserved,
            completed=msg.completed,
            transferred_out=msg.transferred_out,
            requeued=msg.requeued,
            in_doubt=self.coordinator.involving(peer) + self.pending_moves[peer],
        )
        intents = self.migration.receive(report, time.time())
        self._save()
        self._show_migration()
        return intents

    async def carry_out(self, intents: list[Intent]) -> None:
        """Do what the migration asks; outcomes come back as reports and finished moves."""
        for intent in intents:
            if isinstance(intent, HoldServer):
                await self.links.send(intent.server, DrainRequest(hold=True))
            elif isinstance(intent, RequeueRunning):
                log.info("%s: drain grace over; requeueing its running tasks", intent.server)
                await self.links.send(intent.server, DrainRequest(hold=True, requeue_running=True))
            elif isinstance(intent, ReleaseServer):
                await self.links.send(intent.server, DrainRequest(hold=False))
            elif isinstance(intent, MoveQueued):
                # Counted at once, not when the task runs: a report of either server that
                # arrives before the transfer starts must see it as unsettled.
                self.pending_moves.update((intent.source, intent.target))
                task = asyncio.create_task(self._drain_move(intent), name="balancer-drain-move")
                self.drain_moves.add(task)
                task.add_done_callback(self.drain_moves.discard)
            elif isinstance(intent, Retired):
                self._retire(intent.server)

    async def _drain_move(self, move: MoveQueued) -> None:
        """One `MoveQueued`: a two-phase transfer, answered with exactly one `MoveDone`.
        A server just added may not be linked yet: the transfer waits for both links a
        little (rather than go in doubt at once), then starts whatever their state."""
        started = None
        try:
            async with self.link_changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.link_changed.wait_for(
                            lambda: (
                                self.links.connected(move.source)
                                and self.links.connected(move.target)
                            )
                        ),
                        LINK_WAIT_S,
                    )
            started = self._start_transfer(move.source, move.target, move.count)
        except LocalProtocolError as exc:
            log.warning("drain move %s -> %s: %s", move.source, move.target, exc)
        finally:
            self.pending_moves.subtract((move.source, move.target))
        moved = 0 if started is None else await self._finish_transfer(*started)
        self.metrics.drain_moved.inc(moved)
        self.metrics.tasks_moved.inc(moved)
        try:
            intents = self.migration.receive(MoveDone(move.source, move.target, moved), time.time())
        except StaleMessage as exc:  # superseded meanwhile
            log.debug("%s", exc)
            return
        self._save()
        await self.carry_out(intents)

    def _retire(self, name: str) -> None:
        """It holds nothing: no link, no transfers, in nothing from now on."""
        if name in self.names:
            # Carried out after a newer topology brought it back: stale (it is released).
            log.debug("retirement of %s is stale: it is in the topology again", name)
            return
        self.coordinator.set_servers(self.linked_names)
        self._sync_links()
        self.metrics.retired.inc()
        self._save()
        self._show_migration()
        log.info("server %s retired: it holds nothing and may be stopped", name)
        self.publish({"event": "retired", "server": name})

    async def run_migration(self) -> None:
        """The migration's timer: probes, the drain grace, releases."""
        step = min(0.25, self.migration.probe_interval_s / 2)
        while True:
            await asyncio.sleep(step)
            try:
                await self.carry_out(self.migration.handle_timer(time.time()))
                self._show_migration()
            except Exception:  # pragma: no cover - the timer must never stop
                log.exception("migration timer failed")

    def _show_migration(self) -> None:
        status = self.migration.status(time.time())
        self.metrics.show_migration(status)

    # --- persistence ------------------------------------------------------------------------

    def _restore(self, topology: Topology) -> Migration:
        probe = self.settings.probe_interval_s
        if self.state_path is None or not self.state_path.exists():
            return Migration(topology, probe)
        try:
            saved = json.loads(self.state_path.read_text(encoding="utf-8"))
            return Migration.from_json_data(saved)
        except (OSError, UnicodeDecodeError, ValueError, LocalProtocolError) as exc:
            raise BalancerStateError(
                f"cannot use the saved topology {self.state_path}: {exc} (move it away to "
                "start afresh; servers still draining would then keep their tasks)"
            ) from None

    def _save(self) -> None:
        """Write the desired topology and the migration atomically (when a state directory
        is set)."""
        if self.state_path is None:
            return
        data = json.dumps(self.migration.to_json_data(), separators=(",", ":"))
        try:
            write_atomic(self.state_path, data)
        except OSError as exc:
            log.error("cannot save the topology state to %s: %s", self.state_path, exc)

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
            in_doubt=len(self.coordinator.in_doubt),
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
