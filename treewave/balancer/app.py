"""The balancer: starts waves, runs the policy and the transfers, serves the HTTP API.

It keeps one WebSocket link to every server. Waves are driven by the core's initiators
(`EchoInitiator`, `FinnInitiator`); this module only sends what they return, feeds them
the replies and their deadlines, and turns their decisions into API answers and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from treewave.balancer.access import access_middleware
from treewave.balancer.metrics import BalancerMetrics
from treewave.balancer.settings import BalancerSettings
from treewave.balancer.status import setup_status
from treewave.balancer.traces import WaveTraces, sampled_waves, setup_traces
from treewave.core.echo import EchoInitiator
from treewave.core.errors import ProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.events import EchoResult, FinnResult, Send
from treewave.core.finn import FinnInitiator
from treewave.core.load import expected_work_s, pressure
from treewave.core.messages import (
    EchoExplore,
    EchoReply,
    ErrorReply,
    FinnSets,
    FinnWork,
    ServerState,
    SubmitTasks,
    Task,
    TasksAccepted,
    TracePart,
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
    describe_errors,
    parse_message,
)
from treewave.core.messages import Model as MessageModel
from treewave.core.policy import (
    Move,
    expected_makespan,
    imbalance,
    loads_of,
    max_pressure,
    plan_moves,
)
from treewave.core.topology import BALANCER, Topology, load_topology
from treewave.wire.addressing import peer_url
from treewave.wire.links import LinkSet, dial_forever

log = logging.getLogger("treewave.balancer")

HISTORY = 20


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
    """Who asked: "api", "rebalance" or "status" (the page's refreshes stay out of the
    history so they do not push real waves out of it)."""
    states: tuple[ServerState, ...] = ()
    decided: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {
            "wave_id": self.wave_id,
            "algorithm": self.algorithm,
            "complete": self.complete,
            "missing": self.missing,
            "messages": self.messages,
            "duration_s": round(self.duration_s, 6),
            "finished_at": self.finished_at,
            "trigger": self.trigger,
        }


@dataclass
class PendingWave:
    initiator: EchoInitiator | FinnInitiator
    done: asyncio.Future[EchoResult | FinnResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class TransferFailed(Exception):
    pass


@dataclass
class InDoubt:
    """A transfer whose outcome the donor has not yet been told."""

    source: str
    target: str
    accepted: bool | None = None
    """The recipient's verdict once known (it is final: `cancel` pins it)."""


class Balancer:
    def __init__(self, settings: BalancerSettings, topology: Topology) -> None:
        self.settings = settings
        self.topology = topology
        self.names = frozenset(topology.names)
        self.wave_timeout_s = settings.wave_timeout_s or topology.settings.wave_timeout_s
        interval = settings.rebalance_interval_s
        self.rebalance_interval_s = (
            topology.settings.rebalance_interval_s if interval is None else interval
        )
        self.metrics = BalancerMetrics(topology)
        self.links = LinkSet()
        self.waves: dict[str, PendingWave] = {}
        self.replies: dict[tuple[str, str], asyncio.Future[MessageModel]] = {}
        self.in_doubt: dict[str, InDoubt] = {}
        self.history: deque[WaveRecord] = deque(maxlen=HISTORY)
        self.last_echo: WaveRecord | None = None
        self.last_moves: list[dict[str, Any]] = []
        self.last_rebalance_at: float | None = None
        self.rebalance_lock = asyncio.Lock()
        self.rebalance_soon = asyncio.Event()
        """Set when new work arrives: the periodic loop rebalances at once, not at the next
        tick (only when periodic rebalancing is on)."""
        self.listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self._resolving: set[str] = set()
        self._ids = itertools.count(1)
        self._instance = secrets.token_hex(3)
        self.traces = WaveTraces(settings, topology, self.links, self.publish)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self._instance}-{next(self._ids)}"

    # --- frames from servers ---------------------------------------------------------------

    async def on_frame(self, peer: str, text: str) -> None:
        try:
            msg = parse_message(text)
            self.handle(peer, msg)
        except StaleMessage as exc:
            self.metrics.invalid.labels(exc.reason).inc()
            log.debug("%s", exc)
        except ProtocolError as exc:
            self.metrics.invalid.labels(exc.reason).inc()
            log.warning("rejected a frame from %s: %s", peer, exc)
            await self.links.send(peer, ErrorReply(error=str(exc)[:2000]))

    def handle(self, peer: str, msg: Any) -> None:
        if isinstance(msg, (EchoExplore, EchoReply, FinnSets)):
            if msg.sender != peer:
                raise RemoteProtocolError(
                    f"{peer!r} sent a message claiming to be from {msg.sender!r}",
                    reason="sender_mismatch",
                )
            pending = self.waves.get(msg.wave)
            if pending is None:
                raise StaleMessage(f"wave {msg.wave} is not in flight")
            init = pending.initiator
            result: EchoResult | FinnResult | None
            if isinstance(init, EchoInitiator):
                if isinstance(msg, FinnSets):
                    raise RemoteProtocolError("finn message in an echo wave", "wrong_algorithm")
                result = init.receive(msg)
            else:
                if not isinstance(msg, FinnSets):
                    raise RemoteProtocolError("echo message in a finn wave", "wrong_algorithm")
                result = init.receive(msg)
            self.traces.received(peer, msg)
            if result is not None and not pending.done.done():
                pending.done.set_result(result)
            return
        if isinstance(msg, TracePart):
            self.traces.on_part(peer, msg)
            return
        if isinstance(msg, (TransferPrepared, TransferOutcome, TransferSettled, TasksAccepted)):
            key = msg.first if isinstance(msg, TasksAccepted) else msg.transfer
            fut = self.replies.get((msg.type, key))
            if fut is None or fut.done():
                raise StaleMessage(f"unexpected {msg.type} for {key}")
            fut.set_result(msg)
            return
        if isinstance(msg, TransferReservations):
            for r in msg.reservations:
                if r.transfer not in self.in_doubt and r.target in self.names:
                    log.info("transfer %s held by %s is in doubt; resolving", r.transfer, peer)
                    self._doubt(r.transfer, InDoubt(peer, r.target))
            return
        if isinstance(msg, ErrorReply):
            log.warning("%s reported an error: %s", peer, msg.error)
            return
        raise RemoteProtocolError(f"{msg.type} is not something servers send", "unexpected_type")

    # --- waves ---------------------------------------------------------------------------------

    async def run_echo(self, trigger: str = "api") -> WaveRecord:
        wave = self.new_id("echo")
        init = EchoInitiator(wave, self.topology.root, self.names)
        started = time.monotonic()
        # Deadlines step down per hop; a quarter of the budget per (depth + 2) hops leaves
        # room for spanning-tree paths longer than the topology's depth.
        hop_s = self.wave_timeout_s / (4 * (self.topology.depth + 2))
        sends = init.start(started, self.wave_timeout_s, hop_s)
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
        expires_at = time.time() + self.wave_timeout_s
        sends = init.start(started, self.wave_timeout_s, expires_at)
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
        if record.trigger != "status":
            self.history.appendleft(record)
        self.traces.finished(record)
        if not record.complete:
            log.warning(
                "%s wave %s partial, missing %s", record.algorithm, record.wave_id, record.missing
            )
        self.publish({"event": "wave", "wave": record.summary()})

    async def run_timers(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_s)
            now = time.monotonic()
            for pending in list(self.waves.values()):
                result = pending.initiator.handle_timer(now)
                if result is not None and not pending.done.done():
                    pending.done.set_result(result)

    # --- transfers -------------------------------------------------------------------------

    async def _ask(self, to: str, msg: MessageModel, reply_type: str, transfer: str) -> Any:
        """Send a transfer step and wait for its answer; TransferFailed if none comes."""
        key = (reply_type, transfer)
        fut: asyncio.Future[MessageModel] = asyncio.get_running_loop().create_future()
        self.replies[key] = fut
        try:
            if not await self.links.send(to, msg):
                raise TransferFailed(f"no link to {to}")
            return await asyncio.wait_for(fut, self.settings.step_timeout_s)
        except TimeoutError:
            raise TransferFailed(f"{to} did not answer {type(msg).__name__}") from None
        finally:
            self.replies.pop(key, None)

    async def transfer(
        self, source: str, target: str, count: int, durations: tuple[float, ...] | None = None
    ) -> int:
        """Move up to `count` queued tasks (of about these `durations`, if given) from
        `source` to `target`, two-phase; returns how many moved. On any failure the tasks
        stay with (or go back to) the donor, or stay reserved at the donor, in doubt, until
        `resolve` learns which way it went."""
        tid = self.new_id("xfer")
        try:
            prepared = await self._ask(
                source,
                TransferPrepare(transfer=tid, target=target, count=count, durations=durations),
                "transfer.prepared",
                tid,
            )
        except TransferFailed as exc:
            # The donor may have reserved without our hearing: resolve like any doubt.
            log.warning("transfer %s: prepare failed: %s", tid, exc)
            self._doubt(tid, InDoubt(source, target))
            return 0
        tasks: tuple[Task, ...] = prepared.tasks
        if not tasks:
            self.metrics.transfers.labels("empty").inc()
            return 0
        record = InDoubt(source, target)
        self._doubt(tid, record)
        # This coroutine drives the transfer; the resolver loop leaves it alone meanwhile
        # (their requests would share one reply key).
        self._resolving.add(tid)
        try:
            try:
                outcome = await self._ask(
                    target,
                    TransferDeliver(transfer=tid, source=source, tasks=tasks),
                    "transfer.outcome",
                    tid,
                )
            except TransferFailed as exc:
                log.warning("transfer %s: deliver failed: %s", tid, exc)
            else:
                record.accepted = outcome.outcome == "accepted"
            await self._resolve(tid, record)
        finally:
            self._resolving.discard(tid)
        # The tasks moved iff the recipient accepted them (the donor may settle later).
        return len(tasks) if record.accepted else 0

    def _doubt(self, tid: str, record: InDoubt) -> None:
        self.in_doubt[tid] = record
        self.metrics.in_doubt.set(len(self.in_doubt))

    async def resolve(self, tid: str) -> None:
        """Settle an in-doubt transfer: learn the recipient's verdict if still unknown (a
        `cancel` is answered `accepted` if it already has the tasks, else pins the refusal),
        then tell the donor to commit or abort. Safe to repeat; retried until it sticks."""
        record = self.in_doubt.get(tid)
        if record is None or tid in self._resolving:
            return
        self._resolving.add(tid)
        try:
            await self._resolve(tid, record)
        finally:
            self._resolving.discard(tid)

    async def _resolve(self, tid: str, record: InDoubt) -> None:
        if record.accepted is None:
            try:
                outcome = await self._ask(
                    record.target, TransferCancel(transfer=tid), "transfer.outcome", tid
                )
            except TransferFailed:
                return
            record.accepted = outcome.outcome == "accepted"
        msg: MessageModel = (
            TransferCommit(transfer=tid) if record.accepted else TransferAbort(transfer=tid)
        )
        try:
            await self._ask(record.source, msg, "transfer.settled", tid)
        except TransferFailed:
            log.warning("transfer %s: donor %s did not settle; will retry", tid, record.source)
            return
        self.in_doubt.pop(tid, None)
        self.metrics.in_doubt.set(len(self.in_doubt))
        self.metrics.transfers.labels("committed" if record.accepted else "aborted").inc()

    async def run_resolver(self) -> None:
        """Retry in-doubt transfers until each is settled."""
        while True:
            await asyncio.sleep(1.0)
            for tid in list(self.in_doubt):
                if tid in self.in_doubt:
                    await self.resolve(tid)

    async def on_link_up(self, name: str) -> None:
        """A server (re)connected: ask for reservations we may have lost track of."""
        await self.links.send(name, TransferQuery())

    # --- rebalancing ---------------------------------------------------------------------------

    async def rebalance(self) -> dict[str, Any]:
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
                {"source": m.source, "target": m.target, "tasks": n}
                for m, n in zip(moves, moved, strict=True)
                if n > 0
            ]
            self.metrics.tasks_moved.inc(sum(moved))
            if done:
                self.last_moves = done
                self.last_rebalance_at = time.time()
                self.publish({"event": "moves", "moves": done})
            return {
                "moves": done,
                "planned": [
                    {"source": m.source, "target": m.target, "tasks": m.tasks} for m in moves
                ],
                "max_pressure_before": round(max_pressure(loads), 6),
                "max_pressure_after": round(max_pressure(loads_of(after.states, task_time_s)), 6),
                "expected_makespan_before_s": round(expected_makespan(loads), 6),
                "expected_makespan_after_s": round(
                    expected_makespan(loads_of(after.states, task_time_s)), 6
                ),
                "complete": before.complete and after.complete,
                "missing": sorted(set(before.missing) | set(after.missing)),
            }

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
        duration = duration_s or self.topology.settings.task_time_s
        batch = self.new_id("t")
        tasks = tuple(
            Task(id=f"{batch}.{i}", duration_s=duration, actual_s=actual_s) for i in range(count)
        )
        # Answered only once the server confirms the tasks are queued and on disk: a
        # server dying with the submission unread must not leave them acknowledged.
        key = ("tasks.accepted", tasks[0].id)
        fut: asyncio.Future[MessageModel] = asyncio.get_running_loop().create_future()
        self.replies[key] = fut
        try:
            if not await self.links.send(node, SubmitTasks(tasks=tasks)):
                raise web.HTTPServiceUnavailable(
                    text=_error_text(f"server {node!r} is not connected; nothing was queued"),
                    content_type="application/json",
                )
            try:
                await asyncio.wait_for(fut, self.settings.step_timeout_s)
            except TimeoutError:
                raise web.HTTPGatewayTimeout(
                    text=json.dumps(
                        {
                            "error": f"server {node!r} did not confirm the tasks; they may "
                            "or may not be queued there",
                            "node": node,
                            "first_task": tasks[0].id,
                            "last_task": tasks[-1].id,
                        }
                    ),
                    content_type="application/json",
                ) from None
        finally:
            self.replies.pop(key, None)
        self.rebalance_soon.set()
        return [t.id for t in tasks]

    # --- live updates ----------------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        for q in list(self.listeners):
            if q.qsize() < 100:
                q.put_nowait(event)

    def status(self) -> dict[str, Any]:
        echo = self.last_echo
        return {
            "topology": {
                "root": self.topology.root,
                "servers": [
                    {"name": s.name, "cpus": s.cpus, "children": list(s.children)}
                    for s in self.topology.servers
                ],
                "edges": [{"source": a, "target": b} for a, b in self.topology.edges],
                "overload_percent": self.topology.settings.overload_percent,
                "task_time_s": self.topology.settings.task_time_s,
            },
            "links": {n: self.links.connected(n) for n in self.topology.names},
            "snapshot": None if echo is None else tree_json(echo, self.topology),
            "waves": [w.summary() for w in self.history],
            "moves": self.last_moves,
            "last_rebalance_at": self.last_rebalance_at,
            "rebalance_interval_s": self.rebalance_interval_s,
            "in_doubt": len(self.in_doubt),
        }


def tree_json(record: WaveRecord, topology: Topology) -> dict[str, Any]:
    """A snapshot for the API and the status page; `pressure` (expected work per CPU,
    seconds) comes from `core.load`, so no client computes it."""
    task_time_s = topology.settings.task_time_s
    return {
        **record.summary(),
        "nodes": [
            {
                "name": s.name,
                "cpus": s.cpus,
                "running": s.running,
                "queued": s.queued,
                "completed": s.completed,
                "reserved": s.reserved,
                "expected_work_s": round(expected_work_s(s, task_time_s), 6),
                "pressure": round(pressure(s, task_time_s), 6),
                "echo_parent": s.echo_parent,
            }
            for s in sorted(record.states, key=lambda s: topology.names.index(s.name))
        ],
        "edges": [{"source": a, "target": b} for a, b in topology.edges],
    }


# --- HTTP API ----------------------------------------------------------------------------------


class FinnRequest(BaseModel):
    # Strict: `"2"`, `true` or `2.0` for a count is a wrong type, not 2 or 1.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    tasks_per_node: int = Field(default=1, ge=0, le=10_000)
    duration_s: float | None = Field(default=None, gt=0, le=3600)


class SubmitRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    node: str = Field(min_length=1, max_length=63)
    count: int = Field(ge=1, le=100_000)
    duration_s: float | None = Field(default=None, gt=0, le=3600)
    actual_s: float | None = Field(default=None, gt=0, le=3600)
    """Emulation only: how long the tasks really run when the declaration is wrong."""


class EmptyRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


BALANCER_KEY = web.AppKey("balancer", Balancer)
MAX_BODY_BYTES = 64 * 1024


def _error_text(message: str) -> str:
    return json.dumps({"error": message})


def json_error(status: int, message: str) -> web.HTTPException:
    """An HTTP error whose body is `{"error": message}`."""
    exc = web.HTTPException(text=_error_text(message), content_type="application/json")
    exc.set_status(status)
    return exc


M = TypeVar("M", bound=BaseModel)


async def read_body(request: web.Request, model: type[M]) -> M:
    """Parse a JSON body into `model`; every failure is a 4xx naming the problem."""
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise json_error(413, f"body too large ({len(raw)} bytes, limit {MAX_BODY_BYTES})")
    if not raw.strip():
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] in ("json_invalid", "json_type") for e in exc.errors()):
            raise json_error(400, "malformed JSON: " + describe_errors(exc)) from None
        raise json_error(422, describe_errors(exc)) from None


async def api_tree(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    record = await b.run_echo()
    return web.json_response(tree_json(record, b.topology))


async def api_finn(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    body = await read_body(request, FinnRequest)
    record = await b.run_finn(
        FinnWork(tasks_per_node=body.tasks_per_node, duration_s=body.duration_s)
    )
    return web.json_response(
        {**record.summary(), "decided": list(record.decided), "tasks_per_node": body.tasks_per_node}
    )


async def api_rebalance(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    await read_body(request, EmptyRequest)
    return web.json_response(await b.rebalance())


async def api_tasks(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    body = await read_body(request, SubmitRequest)
    if body.node not in b.names:
        raise json_error(404, f"unknown server {body.node!r}")
    ids = await b.submit(body.node, body.count, body.duration_s, body.actual_s)
    return web.json_response(
        {"node": body.node, "accepted": len(ids), "first_task": ids[0], "last_task": ids[-1]},
        status=202,
    )


async def api_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[BALANCER_KEY].status())


async def healthz(request: web.Request) -> web.Response:
    b = request.app[BALANCER_KEY]
    up = sum(1 for n in b.topology.names if b.links.connected(n))
    return web.json_response({"status": "ok", "links_up": up, "servers": len(b.names)})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[BALANCER_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def count_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            route = request.match_info.route.resource
            name = route.canonical if route is not None else "unmatched"
            request.app[BALANCER_KEY].metrics.api_errors.labels(name, str(exc.status)).inc()
            if exc.content_type != "application/json":
                detail = (exc.text or "").strip()
                if not detail or detail.startswith(f"{exc.status}:"):
                    detail = f"{exc.reason}: {request.method} {request.path}"
                exc.text = _error_text(detail)
                exc.content_type = "application/json"
        raise


def create_app(settings: BalancerSettings, topology: Topology | None = None) -> web.Application:
    topo = topology or load_topology(settings.topology)
    balancer = Balancer(settings, topo)
    # Access rules first: a refused request never reaches a handler (balancer/access.py).
    check_access = access_middleware(settings.access, balancer.metrics.registry)
    app = web.Application(middlewares=[check_access, count_errors], client_max_size=MAX_BODY_BYTES)
    app[BALANCER_KEY] = balancer
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/tree", api_tree)
    app.router.add_get("/api/status", api_status)
    app.router.add_post("/api/finn", api_finn)
    app.router.add_post("/api/rebalance", api_rebalance)
    app.router.add_post("/api/tasks", api_tasks)
    setup_status(app)
    setup_traces(app, app[BALANCER_KEY].traces)
    app.cleanup_ctx.append(_background)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    b = app[BALANCER_KEY]
    session = aiohttp.ClientSession()
    tasks = [
        asyncio.create_task(b.run_timers(), name="balancer-timers"),
        asyncio.create_task(b.run_resolver(), name="balancer-resolver"),
        asyncio.create_task(b.run_periodic_rebalance(), name="balancer-rebalance"),
    ]
    for name in b.topology.names:
        url = peer_url(name, b.settings.peer_url_template, b.settings.peer_urls)
        link = dial_forever(
            session, name, url, BALANCER, b.settings.secret, b.links, b.on_frame, b.on_link_up
        )
        tasks.append(
            asyncio.create_task(
                link,
                name=f"balancer-link-{name}",
            )
        )
    yield
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for pending in b.waves.values():
        if not pending.done.done():
            pending.done.cancel()
    await b.links.close_all()
    await session.close()
