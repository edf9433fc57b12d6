"""The balancer's status page: `/`, `/static/`, and the live `/api/events` stream.

Real servers (`treewave node` processes on free ports, linked by a peers file) and the
balancer in-process (`create_app` under aiohttp's test server), so the stream carries real
Echo snapshots. The drawing's layout is checked as a pure function too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.ports import free_ports
from treewave.balancer.app import BALANCER_KEY, create_app
from treewave.balancer.settings import BalancerSettings
from treewave.balancer.status import (
    HUB_KEY,
    NODE_W,
    SLOT_W,
    layers_of,
    layout,
    sse_frame,
)
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.topology import ServerSpec, Settings, Topology

REPO = Path(__file__).resolve().parents[2]

# A small DAG: delta has two parents. Every cpu starts busy with a long task, so whatever
# arrives later is queued (and stays queued for the whole test).
TOPOLOGY = Topology.from_servers(
    [
        ServerSpec(name="alpha", cpus=2, tasks=2, children=("beta", "gamma")),
        ServerSpec(name="beta", cpus=1, tasks=1, children=("delta",)),
        ServerSpec(name="gamma", cpus=2, tasks=2, children=("delta", "epsilon")),
        ServerSpec(name="delta", cpus=1, tasks=1),
        ServerSpec(name="epsilon", cpus=1, tasks=1),
    ],
    Settings(task_time_s=600, rebalance_interval_s=0, wave_timeout_s=3),
)
NAMES = set(TOPOLOGY.names)


@dataclass
class Servers:
    directory: Path
    topology_file: Path
    peers: dict[str, str]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """One `treewave node` process per server of TOPOLOGY."""
    d = tmp_path_factory.mktemp("status-cluster")
    topo = d / "topology.json"
    topo.write_text(TOPOLOGY.dumps(), encoding="utf-8")
    ports = dict(zip(TOPOLOGY.names, free_ports(len(TOPOLOGY)), strict=True))
    peers = {n: f"ws://127.0.0.1:{p}/ws" for n, p in ports.items()}
    peers_file = d / "peers.json"
    peers_file.write_text(json.dumps(peers), encoding="utf-8")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, port in ports.items():
            with (d / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "treewave.cli.main", "node"),
                        *("--name", name, "--port", str(port), "--host", "127.0.0.1"),
                        *("--topology", str(topo), "--peers", str(peers_file)),
                    ],
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
        deadline = time.monotonic() + 60
        pending = set(ports)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                if procs[name].poll() is not None:
                    log_text = (d / f"{name}.log").read_text(errors="replace")
                    pytest.fail(f"server {name} exited:\n{log_text}")
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", ports[name]), timeout=1).close()
                    pending.discard(name)
            time.sleep(0.1)
        assert not pending, f"servers never listened: {sorted(pending)}"
        yield Servers(d, topo, peers)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _app(servers: Servers, interval: float = 1.0) -> web.Application:
    settings = BalancerSettings(
        topology=servers.topology_file,
        peer_urls=servers.peers,
        rebalance_interval_s=0,
        status_interval_s=interval,
    )
    return create_app(settings, TOPOLOGY)


async def _wait_links(app: web.Application, within_s: float = 30.0) -> None:
    b = app[BALANCER_KEY]
    deadline = time.monotonic() + within_s
    while not all(b.links.connected(n) for n in NAMES):
        assert time.monotonic() < deadline, "the balancer never linked to every server"
        await asyncio.sleep(0.05)


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """Parse a text/event-stream body into (event, decoded data) pairs."""
    event = "message"
    data: list[str] = []
    while True:
        raw = await resp.content.readline()
        if not raw:
            return
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


async def _until(
    resp: aiohttp.ClientResponse, want: str, pred: Any = None, within_s: float = 20.0
) -> Any:
    async def find() -> Any:
        async for event, data in _events(resp):
            if event == want and (pred is None or pred(data)):
                return data
        raise AssertionError(f"the stream ended before a matching {want!r} event")

    return await asyncio.wait_for(find(), within_s)


def _full(snapshot: dict[str, Any]) -> bool:
    snap = snapshot.get("snapshot")
    if not snap:
        return False
    return bool(snap["complete"]) and {n["name"] for n in snap["nodes"]} == NAMES


# --- the page -------------------------------------------------------------------------------


async def test_page_lists_every_server_and_loads_nothing_external(
    servers: Servers, aiohttp_client: Any
) -> None:
    app = _app(servers)
    client = await aiohttp_client(app)
    await _wait_links(app)
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    for name in NAMES:
        assert f'data-name="{name}"' in html, name
        assert f'<option value="{name}">' in html, name
    # Every topology edge drawn once, plus the balancer's link to the root.
    assert html.count('<path class="edge') == len(TOPOLOGY.edges) + 1
    assert "://" not in html, "the page must not reference any external URL"
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs, "the page should load its script and stylesheet"
    for ref in refs:
        # Its own script and styles, and the link to the API reference page (same origin).
        assert ref.startswith(("/static/", "data:")) or ref == "/api/docs", ref
        if ref.startswith("/"):
            static = await client.get(ref)
            assert static.status == 200, ref
            body = await static.text()
            assert "://" not in body, ref
    js = await client.get("/static/status.js")
    assert js.status == 200
    assert "javascript" in js.content_type
    css = await client.get("/static/status.css")
    assert css.status == 200
    assert css.content_type == "text/css"
    missing = await client.get("/static/nope.js")
    assert missing.status == 404


async def test_page_marks_echo_tree_edges(servers: Servers, aiohttp_client: Any) -> None:
    app = _app(servers)
    client = await aiohttp_client(app)
    await _wait_links(app)
    html = await (await client.get("/")).text()
    record = app[BALANCER_KEY].last_echo
    assert record is not None, "rendering the page runs an Echo when none is fresh"
    solid = re.findall(r'class="edge echo"\s+data-a="([^"]+)" data-b="([^"]+)"', html)
    pairs = {frozenset(p) for p in solid}
    expected = {frozenset((s.echo_parent, s.name)) for s in record.states}
    assert pairs == expected
    # A spanning tree of the servers plus the balancer: one edge per server.
    assert len(pairs) == len(NAMES)


# --- the event stream -------------------------------------------------------------------------


async def test_no_refresh_waves_while_nobody_watches(servers: Servers, aiohttp_client: Any) -> None:
    app = _app(servers)
    await aiohttp_client(app)
    await _wait_links(app)
    await asyncio.sleep(2.5)
    assert app[HUB_KEY].live_echoes == 0
    assert not app[BALANCER_KEY].history


async def test_events_stream_snapshots_then_stops_when_the_client_leaves(
    servers: Servers, aiohttp_client: Any
) -> None:
    app = _app(servers, interval=1.0)
    hub = app[HUB_KEY]
    client = await aiohttp_client(app)
    await _wait_links(app)
    resp = await client.get("/api/events")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    first = await _until(resp, "snapshot")
    assert {s["name"] for s in first["topology"]["servers"]} == NAMES
    snap = await _until(resp, "snapshot", _full)
    nodes = {n["name"]: n for n in snap["snapshot"]["nodes"]}
    for name in NAMES:
        assert nodes[name]["cpus"] == TOPOLOGY.server(name).cpus
        assert {"running", "queued", "pressure", "echo_parent"} <= nodes[name].keys()
    assert snap["topology"]["overload_percent"] == 100.0
    assert snap["interval_s"] == 1.0
    # The page's own refresh Echoes are marked as such.
    wave = await _until(resp, "wave", lambda w: w["algorithm"] == "echo")
    assert wave["live"] is True
    assert len(hub.clients) == 1

    resp.close()  # the client goes away
    deadline = time.monotonic() + 10
    while hub.clients:
        assert time.monotonic() < deadline, "the hub still counts a client that left"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # let an Echo already in flight finish
    settled = hub.live_echoes
    await asyncio.sleep(2.5)
    assert hub.live_echoes == settled, "Echo waves kept running with nobody watching"


async def test_events_forward_finn_waves_and_show_their_tasks(
    servers: Servers, aiohttp_client: Any
) -> None:
    app = _app(servers, interval=5.0)  # long: the Finn wave itself must trigger the refresh
    client = await aiohttp_client(app)
    await _wait_links(app)
    resp = await client.get("/api/events")
    before = await _until(resp, "snapshot", _full)
    queued = {n["name"]: n["queued"] for n in before["snapshot"]["nodes"]}
    finn = await client.post("/api/finn", json={"tasks_per_node": 2})
    assert finn.status == 200, await finn.text()
    wave = await _until(resp, "wave", lambda w: w["algorithm"] == "finn")
    assert wave["complete"] is True
    assert wave["live"] is False
    started = time.monotonic()
    after = await _until(
        resp,
        "snapshot",
        lambda s: (
            _full(s) and all(n["queued"] >= queued[n["name"]] + 2 for n in s["snapshot"]["nodes"])
        ),
        within_s=4.0,
    )
    assert time.monotonic() - started < 4.0
    assert any(w["algorithm"] == "finn" for w in after["waves"])
    resp.close()


async def test_shutdown_ends_open_streams(servers: Servers) -> None:
    app = _app(servers)
    server = TestServer(app)
    await server.start_server()
    closed = False
    try:
        await _wait_links(app)
        async with aiohttp.ClientSession() as session:
            resp = await session.get(server.make_url("/api/events"))
            await _until(resp, "snapshot")
            hub = app[HUB_KEY]
            assert len(hub.clients) == 1

            async def drain() -> None:
                async for _ in _events(resp):
                    pass

            reader = asyncio.create_task(drain())
            started = time.monotonic()
            await server.close()
            closed = True
            await asyncio.wait_for(reader, 5)  # the stream ends: no error, no hang
            assert time.monotonic() - started < 5
            assert not hub.clients
            resp.close()
    finally:
        if not closed:
            await server.close()


async def test_events_refused_while_shutting_down(servers: Servers, aiohttp_client: Any) -> None:
    app = _app(servers)
    client = await aiohttp_client(app)
    await app[HUB_KEY].close_streams()
    resp = await client.get("/api/events")
    assert resp.status == 503
    assert "error" in await resp.json()


# --- pure parts ---------------------------------------------------------------------------------


def test_sse_frame_is_one_event() -> None:
    frame = sse_frame("snapshot", {"a": [1, 2], "b": "x\ny"})
    assert frame == b'event: snapshot\ndata: {"a":[1,2],"b":"x\\ny"}\n\n'


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("nodes", [1, 2, 10, 30, 60])
def test_layout_places_every_server_in_layers_without_overlap(seed: int, nodes: int) -> None:
    topo = random_topology(nodes, seed, TreeShape(max_children=3, extra_parents=nodes // 5))
    lay = layout(topo)
    layers = layers_of(topo)
    assert set(lay.nodes) == set(topo.names)
    for parent, child in topo.edges:
        assert layers[child] > layers[parent]
        assert lay.nodes[child].y > lay.nodes[parent].y
    by_layer: dict[int, list[float]] = {}
    for p in lay.nodes.values():
        assert NODE_W / 2 <= p.x <= lay.width - NODE_W / 2
        assert 0 <= p.y < lay.height
        by_layer.setdefault(p.layer, []).append(p.x)
    for xs in by_layer.values():
        xs.sort()
        assert all(b - a >= SLOT_W - 0.5 for a, b in itertools.pairwise(xs))
    # Kept to about the widest layer, so 30 servers stay readable on one screen.
    widest = max(len(xs) for xs in by_layer.values())
    assert lay.width <= (widest + 1) * SLOT_W + 40
    assert lay.balancer.y < lay.nodes[topo.root].y
