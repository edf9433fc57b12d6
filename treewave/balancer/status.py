"""The live status page at `/`: the server tree drawn in SVG, coloured by load, kept live
with server-sent events at `/api/events`.

The page is rendered server-side with Jinja2 (layout, colours and numbers of the moment);
a small script from `/static/` then follows the event stream and updates it in place.

`StatusHub` owns the live side. It subscribes to the balancer's wave and move events and
forwards those to every open stream; while at least one stream is open it also runs an Echo
wave every `status_interval_s` (at least 1 s) and pushes a full snapshot after each. With
nobody watching it runs no waves at all. It sees the balancer only through `StatusSource`
(the wave history is the balancer's, its own refresh Echoes marked `live`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jinja2
from aiohttp import web

from treewave.core.api import ClusterStatus, LiveWave, PageSnapshot
from treewave.core.topology import Topology

__all__ = [
    "HUB_KEY",
    "NODE_W",
    "SLOT_W",
    "Layout",
    "Placed",
    "StatusHub",
    "StatusSource",
    "edge_path",
    "layers_of",
    "layout",
    "locked_page",
    "setup_status",
    "sse_frame",
]

log = logging.getLogger("treewave.status")

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

MIN_INTERVAL_S = 1.0
"""Never refresh the page's snapshot more often than this."""
CLIENT_QUEUE = 200
KEEPALIVE_S = 15.0
"""A comment line on an idle stream this often, so a vanished client is noticed."""

BALANCER_NODE = "balancer"
"""The name the balancer goes by in waves (also the root's `echo_parent`)."""

# --- layout ---------------------------------------------------------------------------------

NODE_W = 108
NODE_H = 44
SLOT_W = 122
LAYER_H = 74
MARGIN = 16
BALANCER_W = 84
BALANCER_H = 24


@dataclass(frozen=True)
class Placed:
    name: str
    layer: int
    x: float
    """Centre, in pixels of the SVG's user space."""
    y: float
    """Top edge."""


@dataclass(frozen=True)
class Layout:
    nodes: dict[str, Placed]
    width: float
    height: float
    balancer: Placed


def layers_of(topology: Topology) -> dict[str, int]:
    """Longest-path layering from the root: every edge points to a deeper layer."""
    indegree = {n: len(topology.parents(n)) for n in topology.names}
    ready = [topology.root]
    layer = {topology.root: 0}
    while ready:
        name = ready.pop()
        for child in topology.children(name):
            layer[child] = max(layer.get(child, 0), layer[name] + 1)
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return layer


def _isotonic_spread(desired: Sequence[float], low: float, high: float) -> list[float]:
    """Positions as close as possible (least squares) to `desired`, keeping their order, at
    least 1 apart and inside [low, high]: isotonic regression (pool adjacent violators) on
    desired[i] - i, each first clamped to where position i can be at all."""
    n = len(desired)
    blocks: list[tuple[float, int]] = []  # (mean, size)
    for i, d in enumerate(desired):
        d = min(max(d, low + i), high - (n - 1 - i))
        total, size = d - i, 1
        while blocks and blocks[-1][0] >= total / size:
            mean, k = blocks.pop()
            total += mean * k
            size += k
        blocks.append((total / size, size))
    out: list[float] = []
    for mean, k in blocks:
        out.extend([mean] * k)
    return [v + i for i, v in enumerate(out)]


def layout(topology: Topology) -> Layout:
    """A layered drawing of the DAG: layers by longest path, order within a layer by the
    barycentre of neighbours (a few sweeps), then x positions pulled towards the neighbours'
    mean while keeping one slot between servers of a layer. The drawing is kept to a little
    more than its widest layer, so a wide tree still fits a screen."""
    layer = layers_of(topology)
    depth = max(layer.values())
    rows: list[list[str]] = [[] for _ in range(depth + 1)]
    for name in topology.names:  # file order breaks ties
        rows[layer[name]].append(name)
    widest = max(len(row) for row in rows)
    half = (widest + (1 if widest > 3 else 0) - 1) / 2
    x: dict[str, float] = {}
    for row in rows:
        for i, name in enumerate(row):
            x[name] = i - (len(row) - 1) / 2

    def mean_of(names: Iterable[str], default: float) -> float:
        xs = [x[n] for n in names]
        return sum(xs) / len(xs) if xs else default

    def sweep(indices: Iterable[int], down: bool, reorder: bool) -> None:
        for li in indices:
            row = rows[li]
            desired = {
                n: mean_of(topology.parents(n) if down else topology.children(n), x[n]) for n in row
            }
            if reorder:
                row.sort(key=lambda n: desired[n])
            spread = _isotonic_spread([desired[n] for n in row], -half, half)
            for n, v in zip(row, spread, strict=True):
                x[n] = v

    for i in range(12):
        reorder = i < 6
        sweep(range(1, depth + 1), down=True, reorder=reorder)
        sweep(range(depth - 1, -1, -1), down=False, reorder=reorder)
    left = min(x.values())
    right = max(x.values())
    width = (right - left + 1) * SLOT_W + 2 * MARGIN
    top = MARGIN + BALANCER_H + LAYER_H - NODE_H
    nodes = {
        n: Placed(
            n,
            layer[n],
            round(MARGIN + (x[n] - left + 0.5) * SLOT_W, 1),
            top + layer[n] * LAYER_H,
        )
        for n in topology.names
    }
    root = nodes[topology.root]
    bal = Placed(BALANCER_NODE, -1, root.x, MARGIN)
    height = top + depth * LAYER_H + NODE_H + MARGIN
    return Layout(nodes, round(width, 1), height, bal)


def edge_path(a: Placed, b: Placed, a_height: float = NODE_H) -> str:
    """A smooth curve from the bottom of `a` to the top of `b`."""
    y1 = a.y + a_height
    y2 = b.y
    mid = (y2 - y1) / 2
    return (
        f"M{a.x:.1f},{y1:.1f} C{a.x:.1f},{y1 + mid:.1f} {b.x:.1f},{y2 - mid:.1f} {b.x:.1f},{y2:.1f}"
    )


# --- the hub ----------------------------------------------------------------------------------


CLOSE: dict[str, Any] = {"event": "__close__"}


def sse_frame(event: str, data: Any) -> bytes:
    """One server-sent event; `data` as compact JSON on one line."""
    text = json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n".encode()


class FinishedWave(Protocol):
    @property
    def finished_at(self) -> float: ...


class StatusSource(Protocol):
    """What the status page needs from the balancer."""

    @property
    def topology(self) -> Topology: ...

    @property
    def last_echo(self) -> FinishedWave | None: ...

    def status(self, include_live: bool = False) -> ClusterStatus: ...

    async def run_echo(self, trigger: str = "api") -> Any: ...

    def subscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None: ...

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None: ...


class StatusHub:
    """Open event streams and the live snapshot loop."""

    def __init__(self, balancer: StatusSource, interval_s: float) -> None:
        self.balancer = balancer
        self.interval_s = max(MIN_INTERVAL_S, float(interval_s))
        self.clients: set[asyncio.Queue[dict[str, Any]]] = set()
        self.responses: set[web.StreamResponse] = set()
        self.live_echoes = 0
        """Echo waves run for the page since start (for tests and curiosity)."""
        self.closing = False
        self._watched = asyncio.Event()
        self._wake = asyncio.Event()
        self._listener: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._fresh: asyncio.Task[Any] | None = None

    # lifecycle

    def start(self) -> None:
        self.balancer.subscribe(self._listener)
        self._tasks = [
            asyncio.create_task(self._pump(), name="status-pump"),
            asyncio.create_task(self._refresh_loop(), name="status-refresh"),
        ]

    async def close_streams(self) -> None:
        """End every open event stream (their handlers return and the responses finish)."""
        self.closing = True
        for q in list(self.clients):
            q.put_nowait(CLOSE)
        self._watched.set()

    async def stop(self) -> None:
        await self.close_streams()
        self.balancer.unsubscribe(self._listener)
        tasks = [*self._tasks, *([self._fresh] if self._fresh else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []

    # clients

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.clients.add(q)
        self._watched.set()
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self.clients.discard(q)
        if not self.clients and not self.closing:
            self._watched.clear()

    def broadcast(self, event: dict[str, Any]) -> None:
        for q in list(self.clients):
            if q.qsize() < CLIENT_QUEUE:
                q.put_nowait(event)

    # state

    def snapshot(self) -> PageSnapshot:
        status = self.balancer.status(include_live=True)
        return PageSnapshot(
            **{k: v for k, v in status if k != "waves"},
            waves=[LiveWave(**dict(w), live=w.trigger == "status") for w in status.waves],
            interval_s=self.interval_s,
            server_time=time.time(),
        )

    async def ensure_fresh(self, wait_s: float = 1.0) -> None:
        """Before rendering the page: if the last Echo is missing or stale, start one and
        wait for it briefly (a dead server could hold it until the wave deadline)."""
        last = self.balancer.last_echo
        if last is not None and time.time() - last.finished_at < self.interval_s:
            return
        if self._fresh is None or self._fresh.done():
            self._fresh = asyncio.create_task(self._live_echo(), name="status-fresh")
        await asyncio.wait({self._fresh}, timeout=wait_s)

    async def _live_echo(self) -> None:
        await self.balancer.run_echo(trigger="status")
        self.live_echoes += 1

    # background tasks

    async def _pump(self) -> None:
        """Forward the balancer's events to every stream; a finished Finn wave or a round
        of moves also wakes the refresh loop so the page shows their effect at once."""
        while True:
            event = await self._listener.get()
            kind = event.get("event")
            if kind == "wave" and isinstance(event.get("wave"), dict):
                wave = {**event["wave"], "live": event["wave"].get("trigger") == "status"}
                self.broadcast({"event": "wave", "data": wave})
                if wave.get("algorithm") == "finn":
                    self._wake.set()
            elif kind == "moves":
                self.broadcast({"event": "moves", "data": {"moves": event.get("moves", [])}})
                self._wake.set()
            elif isinstance(kind, str):
                self.broadcast({"event": kind, "data": event})

    async def _refresh_loop(self) -> None:
        last_start = -float("inf")
        while True:
            await self._watched.wait()
            if self.closing:
                return
            pause = last_start + MIN_INTERVAL_S - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            if not self.clients:
                continue
            last_start = time.monotonic()
            self._wake.clear()
            try:
                await self._live_echo()
            except Exception:  # a failed round must not end the loop
                log.exception("status refresh Echo failed")
            self.broadcast({"event": "snapshot", "data": self.snapshot().model_dump(mode="json")})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), timeout=last_start + self.interval_s - time.monotonic()
                )


HUB_KEY = web.AppKey("status_hub", StatusHub)


def _hub(app: web.Application) -> StatusHub:
    return app[HUB_KEY]


# --- handlers -------------------------------------------------------------------------------


@functools.cache
def _environment() -> jinja2.Environment:
    """One per process: the status page and the locked page render from it."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "svg"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["edge_path"] = edge_path
    return env


@functools.cache
def _static_version() -> str:
    """A digest of the static files (they do not change while the process runs): read
    once, not once per page that links them."""
    h = hashlib.sha256()
    for p in sorted(STATIC.glob("*")):
        if p.is_dir():  # swagger-ui/: the API reference page's, not this page's
            continue
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def echo_pairs(nodes: Iterable[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """The last Echo's spanning-tree edges as unordered pairs (sorted tuples)."""
    pairs: set[tuple[str, str]] = set()
    for n in nodes:
        parent = n.get("echo_parent") or ""
        if parent:
            a, b = sorted((str(parent), str(n["name"])))
            pairs.add((a, b))
    return pairs


class StatusPage:
    def __init__(self, env: jinja2.Environment, version: str) -> None:
        self.env = env
        self.version = version
        self.layouts: dict[int, Layout] = {}

    def layout_for(self, topology: Topology) -> Layout:
        key = id(topology)
        if key not in self.layouts:
            self.layouts[key] = layout(topology)
        return self.layouts[key]

    async def index(self, request: web.Request) -> web.Response:
        hub = _hub(request.app)
        await hub.ensure_fresh()
        b = hub.balancer
        snap = hub.snapshot().model_dump(mode="json")
        nodes = {n["name"]: n for n in (snap["snapshot"] or {}).get("nodes", [])}
        html = self.env.get_template("status.html").render(
            status=snap,
            topology=b.topology,
            layout=self.layout_for(b.topology),
            nodes=nodes,
            echo={"|".join(pair) for pair in echo_pairs(nodes.values())},
            overload_percent=b.topology.settings.overload_percent,
            task_time_s=b.topology.settings.task_time_s,
            version=self.version,
            initial_json=json.dumps(snap, separators=(",", ":")),
            node_w=NODE_W,
            node_h=NODE_H,
            balancer_w=BALANCER_W,
            balancer_h=BALANCER_H,
            balancer_name=BALANCER_NODE,
        )
        return web.Response(
            text=html, content_type="text/html", headers={"Cache-Control": "no-store"}
        )


def locked_page() -> Callable[[web.Request], web.Response]:
    """The page `/` shows while reads need the token and this browser has no session: it
    asks for the token and opens one (`POST /api/session`, static/session.js), then loads
    the page again. It holds no data (no server names, no numbers)."""
    html = _environment().get_template("locked.html").render(version=_static_version())

    def answer(request: web.Request) -> web.Response:
        return web.Response(
            text=html, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    return answer


async def events(request: web.Request) -> web.StreamResponse:
    """`text/event-stream`: a snapshot at once, then snapshots, waves and moves as they
    happen, and a comment line now and then so a dead client is noticed."""
    hub = _hub(request.app)
    if hub.closing:
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"error": "the balancer is shutting down"}),
            content_type="application/json",
        )
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    q = hub.subscribe()
    hub.responses.add(resp)
    try:
        await resp.write(b"retry: 2000\n\n")
        await resp.write(sse_frame("snapshot", hub.snapshot().model_dump(mode="json")))
        while True:
            try:
                event = await asyncio.wait_for(q.get(), timeout=KEEPALIVE_S)
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            if event is CLOSE:
                break
            await resp.write(sse_frame(str(event["event"]), event["data"]))
    except ConnectionError:
        log.debug("status stream closed by the client")
    finally:
        hub.unsubscribe(q)
        hub.responses.discard(resp)
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


def setup_status(app: web.Application, source: StatusSource, interval_s: float) -> None:
    """Add the status page (`/`), its static files (`/static/`) and its event stream
    (`/api/events`) to the balancer's app, with the hub's background tasks."""
    hub = StatusHub(source, interval_s)
    app[HUB_KEY] = hub
    page = StatusPage(_environment(), _static_version())
    app.router.add_get("/", page.index, name="status_page")
    app.router.add_get("/api/events", events, name="status_events")
    app.router.add_static("/static/", STATIC, name="static", append_version=False)

    async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
        hub.start()
        yield
        await hub.stop()

    async def on_shutdown(app: web.Application) -> None:
        # Runs before the server waits for open handlers to finish: end the streams now.
        await hub.close_streams()

    app.cleanup_ctx.append(hub_ctx)
    app.on_shutdown.append(on_shutdown)
