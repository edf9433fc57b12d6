"""One server as an aiohttp application: its queue and CPU slots, its links, its metrics.

The wave logic lives in `core.node.NodeProtocol` and the task bookkeeping in
`core.ledger.TaskLedger`; this module only moves frames between sockets and those two,
runs tasks with asyncio (a task holds a slot for its duration without burning the CPU)
and, when a state directory is configured, writes each change of the ledger to the
server's task store (`node.store`, SQLite) before acknowledging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from treewave.core.errors import ProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.events import FinnDecided, Output, Send
from treewave.core.ledger import TRANSFER_REQUESTS, TaskLedger
from treewave.core.load import counts_histogram, expected_work_s, pressure
from treewave.core.messages import (
    MAX_MESSAGE_BYTES,
    Challenge,
    DrainReport,
    DrainRequest,
    EchoExplore,
    EchoReply,
    ErrorReply,
    FinnSets,
    Hello,
    Message,
    ServerState,
    SubmitTasks,
    Task,
    TasksAccepted,
    TraceRequest,
    TransferAbort,
    TransferDeliver,
    TransferPrepare,
    TransferQuery,
    encode,
    parse_message,
)
from treewave.core.messages import Model as MessageModel
from treewave.core.migration import HoldState
from treewave.core.node import NodeProtocol
from treewave.core.topology import BALANCER, ServerSpec, Topology
from treewave.core.trace import TraceRecorder
from treewave.node.metrics import NodeMetrics
from treewave.node.settings import NodeSettings
from treewave.node.store import (
    TRANSFER_COMMIT_POINTS,
    CommitPoint,
    TaskStore,
    database_path,
    stored_cpus,
)
from treewave.wire.addressing import peer_url
from treewave.wire.auth import HELLO_TIMEOUT_S, new_nonce, proof_ok
from treewave.wire.http import LOG_EVERY_S, RejectionLog, json_error, json_errors
from treewave.wire.links import LinkSet, dial_forever, read_frames
from treewave.wire.timers import DeadlineTimer
from treewave.wire.topology_file import load_topology

__all__ = ["SERVER_KEY", "Server", "create_app"]

log = logging.getLogger("treewave.node")


class Server:
    """The running server: everything the handlers and background tasks share."""

    def __init__(self, settings: NodeSettings, topology: Topology) -> None:
        self.settings = settings
        self.topology = topology
        self.name = settings.name
        self.spec = topology.server(settings.name)
        self.cpus = self.spec.cpus
        self.task_time_s = topology.settings.task_time_s
        self.protocol = NodeProtocol(self.name, topology)
        self.trace = TraceRecorder(self.name, settings.trace_waves)
        """This server's part of its recent waves, pushed to the balancer (`push_traces`)."""
        self.trace_due = asyncio.Event()
        self.metrics = NodeMetrics(self.name)
        self.metrics.cpus.set(self.cpus)
        self.links = LinkSet()
        self.wakeup = asyncio.Event()
        self.timers = DeadlineTimer(lambda: self.protocol.next_deadline(), self._deadline_passed)
        """Wave deadlines; `moved()` when a wave starts."""
        self.running_tasks: set[asyncio.Task[None]] = set()
        self.store = (
            TaskStore(database_path(settings.state_dir, self.name))
            if settings.state_dir is not None
            else None
        )
        """Where each acknowledged change is committed first (None: memory only)."""
        self._task_counter = 0
        self.hold = HoldState()
        """Whether it is held (leaving the topology: it starts no queued task and takes no
        new work), and the latest drain request it applied; persisted."""
        self.ledger = self._load_ledger()
        self._save_pending = False
        self.allowed_inbound = {*topology.parents(self.name), BALANCER}
        self._buckets: dict[str, tuple[float, float]] = {}
        self.rejections = RejectionLog()
        """Refused link handshakes are logged once per client per minute (always counted)."""
        self._histogram: tuple[tuple[int, int], tuple[tuple[float, int], ...]] = ((0, -1), ())

    # --- ledger persistence --------------------------------------------------------------------

    def _load_ledger(self) -> TaskLedger:
        """The stored ledger; a state file of the JSON format (earlier releases) is
        imported once; a new server stores its initial tasks."""
        order = self.topology.settings.queue_order
        if self.store is None:
            ledger = TaskLedger(order)
            ledger.submit([self.new_task() for _ in range(self.spec.tasks)])
            return ledger
        ledger, flags = self.store.open_ledger(
            order, lambda: [self.new_task() for _ in range(self.spec.tasks)], self.cpus
        )
        self.hold = HoldState(bool(flags.get("held", False)), int(flags.get("drain_seq", 0)))
        return ledger

    @property
    def held(self) -> bool:
        return self.hold.held

    def save(self, point: CommitPoint) -> None:
        """Commit what the ledger changed since the last save (one SQLite transaction,
        synced) before acknowledging `point`: O(change), not O(queue)."""
        if self.store is None:
            return
        flags = {"held": self.held, "cpus": self.cpus, "drain_seq": self.hold.seq}
        self.store.apply(point, self.ledger.take_changes(), self.ledger, flags)

    def save_soon(self) -> None:
        """Group task completions into one commit per tick (50 ms). Nothing is
        acknowledged on a completion, and losing one in a crash only runs that task again
        (it is still stored as held, and is counted completed once), so they need not be
        committed one by one; any acknowledged operation in between commits them too."""
        if self.store is None or self._save_pending:
            return
        self._save_pending = True

        def flush() -> None:
            self._save_pending = False
            self.save("complete")

        asyncio.get_running_loop().call_later(0.05, flush)

    # --- state -----------------------------------------------------------------------------------

    def new_task(self, prefix: str = "init", duration_s: float | None = None) -> Task:
        self._task_counter += 1
        return Task(
            id=f"{self.name}:{prefix}:{self._task_counter}",
            duration_s=duration_s or self.task_time_s,
        )

    def local_state(self) -> ServerState:
        led = self.ledger
        return self.protocol.local_state(
            self.cpus,
            len(led.running),
            len(led.queued),
            led.completed,
            led.reserved_count,
            running_left_s=tuple(led.running_left(time.monotonic())),
            queued_s=self._queue_histogram(),
        )

    def _queue_histogram(self) -> tuple[tuple[float, int], ...]:
        """The queue's duration histogram, rebuilt only when the queue changed (every Echo
        reply carries it)."""
        version = (id(self.ledger), self.ledger.queue_version)
        if self._histogram[0] != version:
            hist = counts_histogram(self.ledger.queued_durations)
            self._histogram = (version, hist)
        return self._histogram[1]

    def refresh_gauges(self) -> None:
        led = self.ledger
        m = self.metrics
        m.running.set(len(led.running))
        m.queued.set(len(led.queued))
        m.reserved.set(led.reserved_count)
        state = self.local_state()
        m.expected_work.set(expected_work_s(state, self.task_time_s))
        m.pressure.set(pressure(state, self.task_time_s))
        m.links.set(sum(1 for n in self.links.peers if self.links.connected(n)))

    def state_json(self) -> dict[str, object]:
        led = self.ledger
        state = self.local_state()
        return {
            "name": self.name,
            "cpus": self.cpus,
            "running": len(led.running),
            "queued": len(led.queued),
            "expected_work_s": round(expected_work_s(state, self.task_time_s), 6),
            "pressure": round(pressure(state, self.task_time_s), 6),
            "reserved": led.reserved_count,
            "completed": led.completed,
            "held": self.held,
            "transferred_in": led.transferred_in,
            "transferred_out": led.transferred_out,
            "parents": list(self.topology.parents(self.name)),
            "children": list(self.topology.children(self.name)),
            "links": {
                n: self.links.connected(n)
                for n in (*self.allowed_inbound, *self.topology.children(self.name))
            },
            "in_doubt": [
                {"transfer": r.transfer, "target": r.target, "tasks": len(r.tasks)}
                for r in led.reserved.values()
            ],
        }

    # --- frames ----------------------------------------------------------------------------------

    async def on_frame(self, peer: str, text: str) -> None:
        """Validate one frame from `peer` and act on it; a bad frame is answered with an
        error and counted, and changes nothing."""
        await self._send(self.answer_frame(peer, text))
        # No gauge refresh per frame: `/metrics` refreshes them when it is scraped.

    def answer_frame(self, peer: str, text: str) -> list[tuple[str, MessageModel]]:
        """Everything `on_frame` does but the sending: what to send, and to whom (a bad
        frame's error to its sender). `bench.node_cpu --in-process` times this alone."""
        if not self._flood_ok(peer):
            self.metrics.invalid.labels(self.name, "flood").inc()
            return []
        try:
            msg = parse_message(text)
            self._maybe_crash("before", msg.type)
            replies = self.handle(peer, msg)
            self._maybe_crash("after", msg.type)
        except StaleMessage as exc:
            self.metrics.invalid.labels(self.name, exc.reason).inc()
            log.debug("%s: %s", self.name, exc)
            return []
        except ProtocolError as exc:
            self.metrics.invalid.labels(self.name, exc.reason).inc()
            log.warning("%s: rejected a frame from %s: %s", self.name, peer, exc)
            return [(peer, ErrorReply(error=str(exc)[:2000]))]
        return replies

    async def _send(self, sends: list[tuple[str, MessageModel]]) -> None:
        """Send in order; a wave message that cannot go out (no link yet, or any more)
        goes back to the protocol, which may answer it at once (`send_failed`)."""
        work = deque(sends)
        while work:
            to, msg = work.popleft()
            sent = await self.links.send(to, msg)
            if not sent and isinstance(msg, (EchoExplore, EchoReply, FinnSets)):
                work += self._outputs(self.protocol.send_failed(to, msg, self.local_state))

    def _flood_ok(self, peer: str) -> bool:
        """Token bucket per link: a peer may not drown the server in frames."""
        now = time.monotonic()
        rate = self.settings.flood_rate
        tokens, last = self._buckets.get(peer, (2 * rate, now))
        tokens = min(2 * rate, tokens + (now - last) * rate)
        if tokens < 1:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - 1, now)
        return True

    def _maybe_crash(self, when: str, msg_type: str) -> None:
        points = self.settings.crash_points
        if points and f"{when}:{msg_type}" in points:
            log.error("%s: injected crash %s %s", self.name, when, msg_type)
            logging.shutdown()
            os._exit(70)

    def handle(self, peer: str, msg: Message) -> list[tuple[str, MessageModel]]:
        """Apply one validated message; returns (peer, message) pairs to send."""
        if isinstance(msg, (EchoExplore, EchoReply, FinnSets)):
            if msg.sender != peer:
                raise RemoteProtocolError(
                    f"{peer!r} sent a message claiming to be from {msg.sender!r}",
                    reason="sender_mismatch",
                )
            algorithm = "finn" if isinstance(msg, FinnSets) else "echo"
            if self.held:
                raise RemoteProtocolError(
                    f"{self.name!r} is leaving the topology: it takes no part in waves",
                    reason="retiring",
                )
            # Only an Echo reply reads the local state (a queue histogram, a validated
            # model): hand over how to build it, so the other messages never do.
            waves = len(self.protocol.echo_waves) + len(self.protocol.finn_waves)
            out = self.protocol.receive(
                msg, time.monotonic(), self.local_state, wall_now=time.time()
            )
            if len(self.protocol.echo_waves) + len(self.protocol.finn_waves) != waves:
                self.timers.moved()  # a wave began or ended here: its deadline with it
            if self.trace.enabled:
                known = self.protocol.finn_sets(msg.wave) if algorithm == "finn" else None
                self.trace.received(peer, msg, time.time(), known)
            self.metrics.wave_messages.received[algorithm] += 1
            return self._outputs(out)
        if isinstance(msg, ErrorReply):
            log.warning("%s: %s reported an error: %s", self.name, peer, msg.error)
            return []
        if isinstance(msg, Hello):
            raise RemoteProtocolError("hello sent twice on one link", reason="unexpected_type")
        if isinstance(msg, Challenge):
            raise RemoteProtocolError("a challenge is sent only by a server", "unexpected_type")
        if peer != BALANCER:
            raise RemoteProtocolError(
                f"{msg.type} is only accepted from the balancer, not {peer!r}",
                reason="not_allowed",
            )
        return [(BALANCER, reply) for reply in self._balancer_request(msg)]

    def _balancer_request(self, msg: Message) -> list[MessageModel]:
        led = self.ledger
        if isinstance(msg, DrainRequest):
            return [self._drain(msg)]
        if isinstance(msg, SubmitTasks):
            if self.held:
                raise RemoteProtocolError(
                    f"{self.name!r} is leaving the topology: it takes no new tasks",
                    reason="retiring",
                )
            added = led.submit(msg.tasks)
            self.metrics.submitted.inc(added)
            self.save("submit")
            self.wakeup.set()
            # Confirmed only once on disk: the API answers 202 on this.
            return [TasksAccepted(first=msg.tasks[0].id, added=added)] if msg.tasks else []
        if isinstance(msg, TraceRequest):
            return [self.trace.answered(msg.wave)]
        if not isinstance(msg, TRANSFER_REQUESTS):
            raise RemoteProtocolError(
                f"{msg.type} is not a request a server takes", "unexpected_type"
            )
        # The target may be a server this one has never heard of: a server leaving the
        # topology still runs with the old one and hands its tasks to the new servers.
        if isinstance(msg, TransferPrepare) and msg.target == self.name:
            raise RemoteProtocolError(
                f"transfer target {msg.target!r} is not another server", reason="invalid_fields"
            )
        before_in, before_out = led.transferred_in, led.transferred_out
        reply = led.answer(msg, time.time(), held=self.held)
        self.metrics.transferred_in.inc(led.transferred_in - before_in)
        self.metrics.transferred_out.inc(led.transferred_out - before_out)
        if not isinstance(msg, TransferQuery):
            # On disk before the reply: the coordinator acts on it.
            self.save(TRANSFER_COMMIT_POINTS[msg.type])
        if isinstance(msg, (TransferDeliver, TransferAbort)):
            self.wakeup.set()
        return [reply]

    def _drain(self, msg: DrainRequest) -> DrainReport:
        """Hold (or release) this server, requeueing its running tasks if asked; answered
        once on disk, with what it still holds."""
        requeued = 0
        if not self.hold.applies(msg.seq):
            log.info("%s: drain request %d ignored (%d applied)", self.name, msg.seq, self.hold.seq)
        elif msg.requeue_running:
            for runner in list(self.running_tasks):
                runner.cancel()
            requeued = self.ledger.requeue_running()
            if requeued:
                log.info("%s: stopped and requeued %d running tasks", self.name, requeued)
        before, self.hold = self.held, self.hold.after(msg.hold, msg.seq)
        if self.held != before:
            log.info("%s: %s", self.name, "held: leaving the topology" if msg.hold else "released")
        self.save("drain")
        self.wakeup.set()
        return DrainReport(
            held=self.held, requeued=requeued, answers=msg.seq, **self.ledger.drain_counts()
        )

    def _outputs(self, out: list[Output]) -> list[tuple[str, MessageModel]]:
        sends: list[tuple[str, MessageModel]] = []
        for item in out:
            if isinstance(item, FinnDecided):
                self.trace.decided(item.wave, time.time(), self.protocol.finn_sets(item.wave))
                self.trace.done(item.wave)
                tasks = [
                    self.new_task(item.wave, item.work.duration_s)
                    for _ in range(item.work.tasks_per_node)
                ]
                added = self.ledger.submit(tasks)
                self.metrics.submitted.inc(added)
                # On disk before the sets that tell the others (and so the balancer) that
                # this server decided go out: a crash just after must not lose its share.
                self.save("finn")
                self.wakeup.set()
            elif isinstance(item, Send):
                algorithm = "finn" if isinstance(item.message, FinnSets) else "echo"
                self.metrics.wave_messages.sent[algorithm] += 1
                self.trace.sent(item.to, item.message, time.time())
                sends.append((item.to, item.message))
                if type(item.message) is EchoReply:
                    self.trace.done(item.message.wave)
        # This server's part of a wave it is done with goes to the balancer unasked, on the
        # link it has anyway, batched with the other waves of the push window
        # (docs/traces.md); a window of 0 sends it now, after the wave's own messages.
        if self.trace.due:
            if self.settings.trace_push_s > 0:
                self.trace_due.set()
            else:
                sends.extend((BALANCER, frame) for frame in self.trace.push_frames())
        return sends

    async def push_traces(self) -> None:
        """Push the parts of the waves finished within each window in as few frames as
        fit: back-to-back waves share a frame, off the waves' path."""
        while True:
            await self.trace_due.wait()
            await asyncio.sleep(self.settings.trace_push_s)
            self.trace_due.clear()
            for frame in self.trace.push_frames():
                await self.links.send(BALANCER, frame)

    # --- background work -----------------------------------------------------------------------

    async def run_slots(self) -> None:
        """Start queued tasks whenever a CPU slot is free."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while not self.held and len(self.ledger.running) < self.cpus:
                task = self.ledger.start_next(time.monotonic())
                if task is None:
                    break
                runner = asyncio.create_task(self._run_task(task))
                self.running_tasks.add(runner)
                runner.add_done_callback(self.running_tasks.discard)
            self.refresh_gauges()

    async def _run_task(self, task: Task) -> None:
        await asyncio.sleep(task.run_s)
        if self.ledger.finish(task.id):
            self.metrics.completed.inc()
        self.save_soon()
        self.wakeup.set()

    async def _deadline_passed(self, now: float) -> None:
        """Answer Echo waves past their deadline, forget Finn waves past theirs."""
        await self._send(self._outputs(self.protocol.handle_timer(now, self.local_state())))

    async def run_inbound(self, request: web.Request) -> web.WebSocketResponse:
        """A parent's or the balancer's link: hello first, then one reader until close."""
        if "Origin" in request.headers:
            # Browsers send Origin on every WebSocket handshake (and apply no same-origin
            # rule to WebSockets); treewave's own links never do. A web page must not be
            # able to open a link, whatever the secret.
            self.metrics.invalid.labels(self.name, "cross_origin").inc()
            client = request.remote or "unknown"
            if self.rejections.should_log(client, time.monotonic()):
                log.warning(
                    "%s: refused a link from a web page (Origin %s) at %s [further refusals "
                    "of this client are only counted for %g s]",
                    self.name, request.headers["Origin"][:100], client, LOG_EVERY_S,
                )  # fmt: skip
            raise json_error(403, "links are not opened from web pages (the request has an Origin)")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, autoping=False)
        await ws.prepare(request)
        self.links.sockets.add(ws)
        # A fresh nonce per link: the hello must answer this one, so a recorded hello
        # (from this link or any other) is refused.
        nonce = new_nonce()
        try:
            if self.settings.secret:
                await ws.send_str(encode(Challenge(nonce=nonce)))
            first = await ws.receive(timeout=HELLO_TIMEOUT_S)
        except (ConnectionError, RuntimeError):  # the dialer hung up before its hello
            return ws
        except TimeoutError:
            self.metrics.invalid.labels(self.name, "no_hello").inc()
            log.warning("%s: refused a link: no hello within %s s", self.name, HELLO_TIMEOUT_S)
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"no hello")
            return ws
        peer = self._check_hello(first, nonce)
        if isinstance(peer, str) and peer.startswith("!"):
            reason = "too_large" if _too_big(first.data) else "bad_hello"
            self.metrics.invalid.labels(self.name, reason).inc()
            log.warning("%s: refused a link: %s", self.name, peer[1:])
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(ErrorReply(error=peer[1:]).model_dump_json())
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"refused")
            return ws
        old = self.links.attach(peer, ws)
        if old is not None:
            await old.close()
        self.refresh_gauges()
        try:
            error = await read_frames(peer, ws, self.on_frame, self.links)
        finally:
            self.links.detach(peer, ws)
            self.refresh_gauges()
        if _too_big(error):
            self.metrics.invalid.labels(self.name, "too_large").inc()
            log.warning("%s: closed the link from %s: frame too large", self.name, peer)
        return ws

    def _check_hello(self, frame: aiohttp.WSMessage, nonce: str) -> str:
        """The peer's name, or '!' + why the link is refused."""
        if frame.type != aiohttp.WSMsgType.TEXT:
            return "!the first frame must be a text hello"
        try:
            msg = parse_message(frame.data)
        except RemoteProtocolError as exc:
            return f"!{exc}"
        if not isinstance(msg, Hello):
            return f"!the first frame must be hello, got {msg.type}"
        if msg.sender not in self.allowed_inbound:
            return f"!{msg.sender!r} is not a parent of {self.name!r} nor the balancer"
        if not proof_ok(self.settings.secret, nonce, msg.sender, self.name, msg.token):
            return f"!{msg.sender!r} did not answer the challenge with the deployment secret"
        return msg.sender


def _too_big(error: object) -> bool:
    """Whether a link ended because a frame was over `MAX_MESSAGE_BYTES`."""
    return (
        isinstance(error, aiohttp.WebSocketError)
        and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    )


SERVER_KEY = web.AppKey("server", Server)


async def healthz(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    return web.json_response({"status": "ok", "server": server.name})


async def metrics(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    server.refresh_gauges()
    body = generate_latest(server.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def api_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVER_KEY].state_json())


async def api_tasks(request: web.Request) -> web.Response:
    """Every task here by id, for conservation checks."""
    server = request.app[SERVER_KEY]
    return web.json_response(
        {
            "name": server.name,
            "completed_count": server.ledger.completed,
            **server.ledger.task_ids(),
        }
    )


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    return await request.app[SERVER_KEY].run_inbound(request)


def create_app(settings: NodeSettings, topology: Topology | None = None) -> web.Application:
    """The server's app; background tasks and links live in `cleanup_ctx`."""
    topo = topology or load_topology(settings.topology)
    if settings.name not in topo:
        topo = _leaving_topology(settings, topo)
    app = web.Application(middlewares=[json_errors()])
    app[SERVER_KEY] = Server(settings, topo)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/api/tasks", api_tasks)
    app.router.add_get("/ws", ws_handler)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_close_links)
    return app


def _leaving_topology(settings: NodeSettings, topology: Topology) -> Topology:
    """A server missing from the topology file but with a saved queue is leaving the
    topology (under Compose a retiring container restarts with the new, bind-mounted
    file): it comes back on its own, linked to the balancer only, to be drained."""
    cpus = stored_cpus(settings.state_dir, settings.name) if settings.state_dir else None
    if cpus is None:
        raise ValueError(f"server {settings.name!r} is not in the topology")
    log.warning(
        "%s is not in the topology but has a saved queue: starting alone, to be drained",
        settings.name,
    )
    spec = ServerSpec(name=settings.name, cpus=max(1, cpus))
    return Topology.from_servers([spec], topology.settings)


async def _close_links(app: web.Application) -> None:
    """Close every link when shutdown begins: an open inbound WebSocket would otherwise
    hold the graceful shutdown until its peer hangs up or the shutdown timeout passes."""
    await app[SERVER_KEY].links.close_all()


async def _background(app: web.Application) -> AsyncIterator[None]:
    server = app[SERVER_KEY]
    settings = server.settings
    # No connection limit: every open link holds one of the session's connections, and
    # aiohttp's default of 100 left a 300-server balancer with 100 links (Finn partial).
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    tasks = [
        asyncio.create_task(server.run_slots(), name=f"{server.name}-slots"),
        asyncio.create_task(server.timers.run(), name=f"{server.name}-timers"),
        asyncio.create_task(server.links.keep_alive(), name=f"{server.name}-keep-alive"),
        asyncio.create_task(server.push_traces(), name=f"{server.name}-trace-push"),
    ]
    for child in server.topology.children(server.name):
        url = peer_url(child, settings.peer_url_template, settings.peer_urls)
        tasks.append(
            asyncio.create_task(
                dial_forever(
                    session, child, url, server.name, settings.secret, server.links, server.on_frame
                ),
                name=f"{server.name}-link-{child}",
            )
        )
    server.wakeup.set()
    yield
    for t in tasks:
        t.cancel()
    for t in list(server.running_tasks):
        t.cancel()
    await asyncio.gather(*tasks, *server.running_tasks, return_exceptions=True)
    await server.links.close_all()
    await session.close()
    server.save("complete")
    if server.store is not None:
        server.store.close()
