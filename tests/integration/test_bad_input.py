"""Bad input to every route and to the WebSocket endpoint: answered with an error, counted,
the server alive and its state unchanged.

The first tests run against real processes (see `conftest.py`). The fuzz test throws a few
thousand generated bad inputs (random JSON values, raw bytes, valid messages with fields
dropped, added or retyped) at the balancer's routes and at a server's `/ws`, in-process for
speed, and writes how many it tried to `artifacts/fuzz_counts.json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.cluster import Cluster, StartCluster
from tests.support.commands import REPO
from tests.support.http import fetch_json
from tests.support.metrics import counter_by
from tests.support.ports import free_port
from treewave.balancer.app import BALANCER_KEY
from treewave.balancer.app import create_app as create_balancer
from treewave.balancer.settings import BalancerSettings
from treewave.core.errors import RemoteProtocolError
from treewave.core.messages import MAX_MESSAGE_BYTES, parse_message
from treewave.core.topology import Topology
from treewave.node.app import SERVER_KEY
from treewave.node.app import create_app as create_node
from treewave.node.settings import NodeSettings

T = TypeVar("T")
HOUR = 3600

TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": HOUR, "wave_timeout_s": 10},
    "servers": [
        {"name": "aurora", "cpus": 2, "tasks": 3, "children": ["birch", "delta"]},
        {"name": "birch", "cpus": 1, "tasks": 2, "children": ["cedar"]},
        {"name": "cedar", "cpus": 2, "tasks": 1, "children": []},
        {"name": "delta", "cpus": 1, "tasks": 0, "children": []},
    ],
}


async def all_tasks(http: aiohttp.ClientSession, cluster: Cluster, names: list[str]) -> Any:
    return {n: await fetch_json(http, cluster.url(n) + "/api/tasks") for n in names}


async def invalid_counts(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return counter_by(text, "treewave_node_invalid_messages", "reason")


# --- HTTP, real processes ---------------------------------------------------------------------

BIG = {"node": "birch", "count": 1, "pad": "x" * (65 * 1024)}

# (method, path, raw body or JSON value, status, words the error must contain)
BALANCER_CASES: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/api/tasks", b"{not json", 400, "malformed JSON"),
    ("POST", "/api/tasks", b"\xff\xfe\xfd", 400, "malformed JSON"),
    ("POST", "/api/tasks", [1, 2], 422, "object"),
    ("POST", "/api/tasks", "birch", 422, "object"),
    ("POST", "/api/tasks", {"node": "birch"}, 422, "count"),
    ("POST", "/api/tasks", {"count": 3}, 422, "node"),
    ("POST", "/api/tasks", {"node": "birch", "count": "3"}, 422, "count"),
    ("POST", "/api/tasks", {"node": "birch", "count": True}, 422, "count"),
    ("POST", "/api/tasks", {"node": "birch", "count": 2.5}, 422, "count"),
    ("POST", "/api/tasks", {"node": 7, "count": 3}, 422, "node"),
    ("POST", "/api/tasks", {"node": "birch", "count": 3, "duration_s": "1"}, 422, "duration_s"),
    ("POST", "/api/tasks", {"node": "birch", "count": 3, "duration_s": -1}, 422, "duration_s"),
    ("POST", "/api/tasks", {"node": "birch", "count": 3, "owner": "me"}, 422, "unknown field"),
    ("POST", "/api/tasks", {"node": "nowhere", "count": 3}, 404, "unknown server"),
    ("POST", "/api/tasks", {"node": "balancer", "count": 3}, 404, "unknown server"),
    ("POST", "/api/tasks", {"node": "birch", "count": 0}, 422, "count"),
    ("POST", "/api/tasks", {"node": "birch", "count": -4}, 422, "count"),
    ("POST", "/api/tasks", {"node": "birch", "count": 10**30}, 422, "count"),
    ("POST", "/api/tasks", {"node": "birch", "count": 100_001}, 422, "count"),
    ("POST", "/api/tasks", BIG, 413, "size"),
    ("POST", "/api/finn", b"{", 400, "malformed JSON"),
    ("POST", "/api/finn", {"tasks_per_node": -1}, 422, "tasks_per_node"),
    ("POST", "/api/finn", {"tasks_per_node": 10**9}, 422, "tasks_per_node"),
    ("POST", "/api/finn", {"tasks_per_node": "2"}, 422, "tasks_per_node"),
    ("POST", "/api/finn", {"tasks_per_node": None}, 422, "tasks_per_node"),
    ("POST", "/api/finn", {"tasks_per_node": 1, "duration_s": 0}, 422, "duration_s"),
    ("POST", "/api/finn", {"tasks_per_node": 1, "duration_s": 1e9}, 422, "duration_s"),
    ("POST", "/api/finn", {"tasks": 1}, 422, "unknown field"),
    ("POST", "/api/finn", [], 422, "object"),
    ("POST", "/api/finn", {"tasks_per_node": 1, "pad": "x" * (65 * 1024)}, 413, "size"),
    ("POST", "/api/rebalance", {"now": True}, 422, "unknown field"),
    ("POST", "/api/rebalance", b"[[[", 400, "malformed JSON"),
    ("POST", "/api/rebalance", 5, 422, "object"),
    ("POST", "/api/rebalance", None, 422, "object"),
    ("GET", "/api/tasks", None, 405, "Method Not Allowed"),
    ("GET", "/api/finn", None, 405, "Method Not Allowed"),
    ("GET", "/api/rebalance", None, 405, "Method Not Allowed"),
    ("POST", "/api/tree", {}, 405, "Method Not Allowed"),
    ("POST", "/api/status", {}, 405, "Method Not Allowed"),
    ("DELETE", "/api/tasks", None, 405, "Method Not Allowed"),
    ("PUT", "/healthz", {}, 405, "Method Not Allowed"),
    ("POST", "/metrics", {}, 405, "Method Not Allowed"),
    ("GET", "/api/nothing", None, 404, "Not Found"),
    ("GET", "/api/tree/extra", None, 404, "Not Found"),
    ("POST", "/api/session", {}, 404, "no API token configured"),
    ("GET", "/api/session", None, 405, "Method Not Allowed"),
]

NODE_CASES: list[tuple[str, str, Any, int, str]] = [
    ("GET", "/api/nothing", None, 404, "Not Found"),
    ("POST", "/api/tasks", {"queued": ["x"]}, 405, "Method Not Allowed"),
    ("POST", "/api/state", {}, 405, "Method Not Allowed"),
    ("DELETE", "/healthz", None, 405, "Method Not Allowed"),
    ("PUT", "/metrics", b"x", 405, "Method Not Allowed"),
    ("GET", "/ws", None, 400, "WebSocket"),
    ("POST", "/ws", b"{}", 405, "Method Not Allowed"),
]


async def send_raw(
    http: aiohttp.ClientSession, method: str, url: str, body: Any
) -> tuple[int, str, Any]:
    data: bytes | None
    if body is None and method == "GET":
        data = None
    elif isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    async with http.request(method, url, data=data, headers=headers) as resp:
        text = await resp.text()
        return resp.status, resp.content_type, text


@pytest.fixture(scope="module")
def cluster(start_module_cluster: StartCluster) -> Cluster:
    return start_module_cluster(TOPOLOGY)


async def test_bad_http_requests_to_every_route(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    names = cluster.names
    before_tasks = await all_tasks(http, cluster, names)
    before_status = await fetch_json(http, cluster.balancer_url + "/api/status")
    targets = [(cluster.balancer_url, case) for case in BALANCER_CASES]
    targets += [(cluster.url(n), case) for n in ("aurora", "cedar") for case in NODE_CASES]
    for base, (method, path, body, status, words) in targets:
        got, content_type, text = await send_raw(http, method, base + path, body)
        where = f"{method} {base}{path} {str(body)[:60]}"
        assert got == status, (where, got, text)
        assert content_type == "application/json", (where, text)
        error = json.loads(text)["error"]
        assert isinstance(error, str), where
        assert words.lower() in error.lower(), (where, error)
    for name in [*names, "balancer"]:
        assert cluster.healthy(name), name
    assert await all_tasks(http, cluster, names) == before_tasks
    after_status = await fetch_json(http, cluster.balancer_url + "/api/status")
    assert after_status["waves"] == before_status["waves"]  # no wave was started
    assert after_status["in_doubt"] == 0
    tree = await fetch_json(http, cluster.balancer_url + "/api/tree")
    assert tree["complete"] is True


# --- WebSocket, real processes --------------------------------------------------------------

TARGET = "birch"  # its only parent is aurora; its child is cedar


async def expect_error(ws: aiohttp.ClientWebSocketResponse, words: str) -> None:
    msg = await ws.receive(timeout=60)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    frame = json.loads(msg.data)
    assert frame["type"] == "error", frame
    assert words in frame["error"], frame


async def expect_closed(ws: aiohttp.ClientWebSocketResponse) -> None:
    while True:
        msg = await ws.receive(timeout=60)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return


async def test_hostile_websocket_peers(
    start_cluster: StartCluster, http: aiohttp.ClientSession
) -> None:
    """The balancer and birch's parent are held back, so the test can speak as either
    over birch's `/ws` (a server keeps one link per peer) before they start."""
    cluster = start_cluster(TOPOLOGY, hold=("balancer", "aurora"))
    running = ["birch", "cedar", "delta"]
    before = await all_tasks(http, cluster, running)
    base = cluster.url(TARGET)
    counts = await invalid_counts(http, base)
    url = cluster.ws_url(TARGET)
    expected: Counter[str] = Counter()

    async def hello(ws: aiohttp.ClientWebSocketResponse, sender: str) -> None:
        await ws.send_str(json.dumps({"type": "hello", "sender": sender, "token": ""}))

    # Refused at the hello: strangers, a child, a sibling, garbage, silence.
    for sender in ("mallory", "cedar", "delta", "birch"):
        async with http.ws_connect(url) as ws:
            await hello(ws, sender)
            await expect_error(ws, "not a parent")
            await expect_closed(ws)
        expected["bad_hello"] += 1
    for first in ("not json at all", '{"type": "transfer.query"}', '{"type": "hello"}'):
        async with http.ws_connect(url) as ws:
            await ws.send_str(first)
            await expect_error(ws, "")
            await expect_closed(ws)
        expected["bad_hello"] += 1
    async with http.ws_connect(url) as ws:  # says nothing: refused after the hello timeout
        await expect_closed(ws)
    expected["no_hello"] += 1

    # Bad frames on an accepted link, as the balancer.
    async with http.ws_connect(url, max_msg_size=0) as ws:
        await hello(ws, "balancer")
        await ws.send_str("this is not JSON")
        await expect_error(ws, "Invalid JSON")
        expected["malformed_json"] += 1
        await ws.send_str(
            json.dumps({"type": "echo.explore", "wave": ["w"], "sender": 5, "budget_s": "x"})
        )
        await expect_error(ws, "budget_s")
        expected["invalid_fields"] += 1
        state = {"name": "balancer", "cpus": 1, "running": 0, "queued": 0, "completed": 0}
        reply = {"type": "echo.reply", "wave": "nope-1", "sender": "balancer", "states": [state]}
        await ws.send_str(json.dumps({**reply, "sent": 1}))
        await expect_error(ws, "unknown wave")
        expected["unknown_wave"] += 1
        explore = {"type": "echo.explore", "wave": "w-1", "sender": "aurora", "budget_s": 1}
        await ws.send_str(json.dumps(explore))
        await expect_error(ws, "claiming to be from 'aurora'")
        expected["sender_mismatch"] += 1
        await ws.send_str(json.dumps({"type": "transfer.commit", "transfer": "t", "x": 1}))
        await expect_error(ws, "unknown field")
        expected["invalid_fields"] += 1
        # Finally a frame over the 8 MiB limit: the server drops the link.
        with contextlib.suppress(ConnectionError):
            await ws.send_str('{"type": "error", "error": "' + "x" * MAX_MESSAGE_BYTES + '"}')
        await expect_closed(ws)
        expected["too_large"] += 1

    # Transfer requests from a parent (only the balancer may send them).
    async with http.ws_connect(url) as ws:
        await hello(ws, "aurora")
        for frame in (
            {"type": "transfer.prepare", "transfer": "t-1", "target": "cedar", "count": 5},
            {"type": "transfer.abort", "transfer": "t-1"},
            {"type": "tasks.submit", "tasks": [{"id": "evil.1", "duration_s": 1}]},
        ):
            await ws.send_str(json.dumps(frame))
            await expect_error(ws, "only accepted from the balancer")
            expected["not_allowed"] += 1

    assert cluster.healthy(TARGET)
    assert await all_tasks(http, cluster, running) == before
    after = await invalid_counts(http, base)
    grown = {k: after.get(k, 0) - counts.get(k, 0) for k in after}
    assert {k: v for k, v in grown.items() if v} == dict(expected)

    # Now the real balancer and aurora start: the next Echo wave is complete and shows
    # exactly the tasks every server had before.
    cluster.release()
    tree = await fetch_json(http, cluster.balancer_url + "/api/tree")
    assert tree["complete"] is True, tree["missing"]
    assert tree["messages"] == 2 * (len(cluster.edges) + 1)
    loads = {n["name"]: n for n in tree["nodes"]}
    for name in running:
        held = before[name]
        assert loads[name]["queued"] == len(held["queued"]), name
        assert loads[name]["running"] == len(held["running"]), name
    assert await all_tasks(http, cluster, running) == before


# --- fuzzing, in-process ------------------------------------------------------------------------

FUZZ_TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": HOUR, "wave_timeout_s": 5},
    "servers": [
        {"name": "alpha", "cpus": 2, "tasks": 1, "children": ["beta", "gamma"]},
        {"name": "beta", "cpus": 2, "tasks": 5, "children": []},
        {"name": "gamma", "cpus": 1, "tasks": 0, "children": []},
    ],
}
NAMES = ("alpha", "beta", "gamma")
HTTP_EXAMPLES = 1200
WS_EXAMPLES = 1200
HELLO_EXAMPLES = 250

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-3, max_value=100_002)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from([*NAMES, "balancer", "", "hello", "finn", "echo.reply"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
key_names = st.text(min_size=1, max_size=10) | st.sampled_from(
    ["type", "node", "count", "duration_s", "tasks_per_node", "sender", "wave", "tasks", "id"]
)


@st.composite
def mutated(draw: st.DrawFn, templates: list[dict[str, Any]]) -> Any:
    """A valid message with 1-3 fields dropped, added or retyped (also inside lists and
    nested objects)."""
    msg: Any = copy.deepcopy(draw(st.sampled_from(templates)))
    for _ in range(draw(st.integers(1, 3))):
        target = msg
        # Sometimes dig into a nested object (a task, a state, the Finn work).
        nested = [
            v[0] if isinstance(v, list) and v and isinstance(v[0], dict) else v
            for v in target.values()
            if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict))
        ]
        # `len(...) > 0`, not the bare list: mypy would infer `draw`'s type from the list.
        if len(nested) > 0 and draw(st.booleans()):
            target = draw(st.sampled_from(nested))
        op = draw(st.sampled_from(["drop", "add", "retype", "retype"]))
        keys = sorted(target)
        if op == "drop" and keys:
            del target[draw(st.sampled_from(keys))]
        elif op == "retype" and keys:
            target[draw(st.sampled_from(keys))] = draw(json_values)
        else:
            target[draw(key_names)] = draw(json_values)
    return msg


# --- the balancer's API --------------------------------------------------------------------------

HTTP_TEMPLATES: dict[str, list[dict[str, Any]]] = {
    "/api/tasks": [
        {"node": "gamma", "count": 3},
        {"node": "beta", "count": 1, "duration_s": 0.5},
    ],
    "/api/finn": [{"tasks_per_node": 2}, {"tasks_per_node": 1, "duration_s": 1.5}],
    "/api/rebalance": [{}],
    # The harness's balancer has no API token: every session request is refused (404).
    "/api/session": [{}],
}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _duration_ok(body: dict[str, Any]) -> bool:
    d = body.get("duration_s")
    return d is None or (_number(d) and math.isfinite(d) and 0 < d <= 3600)


def request_is_valid(path: str, body: Any) -> bool:
    """The API's contract, written independently of its implementation."""
    if not isinstance(body, dict) or path == "/api/session":
        return False
    if path == "/api/rebalance":
        return body == {}
    if path == "/api/finn":
        k = body.get("tasks_per_node", 1)
        return (
            set(body) <= {"tasks_per_node", "duration_s"}
            and isinstance(k, int)
            and not isinstance(k, bool)
            and 0 <= k <= 10_000
            and _duration_ok(body)
        )
    count = body.get("count")
    return (
        set(body) <= {"node", "count", "duration_s"}
        and body.get("node") in NAMES
        and isinstance(count, int)
        and not isinstance(count, bool)
        and 1 <= count <= 100_000
        and _duration_ok(body)
    )


def raw_is_valid(path: str, raw: bytes) -> bool:
    if not raw.strip():
        return path in ("/api/finn", "/api/rebalance")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return request_is_valid(path, body)


post_paths = st.sampled_from(sorted(HTTP_TEMPLATES))


@st.composite
def bad_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(method, path, body) that the API must refuse."""
    kind = draw(st.sampled_from(["json", "mutated", "mutated", "bytes", "method", "path"]))
    path = draw(post_paths)
    if kind == "method":
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
        return method, path, draw(st.binary(max_size=30))
    if kind == "path":
        tail = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/_-.", max_size=20))
        return "POST", "/api/x" + tail, draw(st.binary(max_size=30))
    if kind == "bytes":
        raw = draw(st.binary(max_size=60))
    elif kind == "json":
        raw = json.dumps(draw(json_values)).encode()
    else:
        raw = json.dumps(draw(mutated(HTTP_TEMPLATES[path]))).encode()
    if raw_is_valid(path, raw):
        raw = raw + b"}"  # make it malformed rather than discard the example
    return "POST", path, raw


# --- a server's /ws ---------------------------------------------------------------------------

ALPHA_STATE = {"name": "alpha", "cpus": 2, "running": 1, "queued": 0, "completed": 0}
TASK = {"id": "job.1", "duration_s": 2.0}
WS_TEMPLATES: list[dict[str, Any]] = [
    {"type": "hello", "sender": "alpha", "token": ""},
    {"type": "error", "error": "boom"},
    {"type": "echo.explore", "wave": "w1", "sender": "alpha", "budget_s": 2.0},
    {"type": "echo.reply", "wave": "w1", "sender": "alpha", "states": [ALPHA_STATE], "sent": 1},
    {
        "type": "finn",
        "wave": "f1",
        "sender": "alpha",
        "inc": ["balancer", "alpha"],
        "ninc": ["balancer", "alpha"],
        "dec": {"balancer": 1, "alpha": 2},
        "work": {"tasks_per_node": 2},
        "budget_s": 2.0,
    },
    {"type": "tasks.submit", "tasks": [TASK]},
    {"type": "transfer.prepare", "transfer": "x1", "target": "gamma", "count": 2},
    {"type": "transfer.prepared", "transfer": "x1", "tasks": [TASK]},
    {"type": "transfer.deliver", "transfer": "x1", "source": "gamma", "tasks": [TASK]},
    {"type": "transfer.cancel", "transfer": "x1"},
    {"type": "transfer.outcome", "transfer": "x1", "outcome": "accepted"},
    {"type": "transfer.commit", "transfer": "x1"},
    {"type": "transfer.abort", "transfer": "x1"},
    {"type": "transfer.settled", "transfer": "x1", "outcome": "committed"},
    {"type": "transfer.query"},
    {"type": "transfer.reservations", "reservations": [{"transfer": "x1", "target": "gamma"}]},
]
BALANCER_ONLY = {
    "tasks.submit",
    "transfer.prepare",
    "transfer.deliver",
    "transfer.cancel",
    "transfer.commit",
    "transfer.abort",
    "transfer.query",
}


def must_be_refused(peer: str, text: str) -> bool:
    """Whether `beta` must answer this frame from `peer` with an error: anything that does
    not parse, and every parsed message beta may not act on. (Valid requests the peer is
    allowed to make, and error reports, which are never answered, are left out.)"""
    try:
        msg = parse_message(text)
    except RemoteProtocolError:
        return True
    kind = msg.type
    if kind == "error":
        return False
    if kind in ("echo.explore", "echo.reply", "finn"):
        sender = getattr(msg, "sender", "")
        # From alpha, only an echo reply (to a wave beta never saw) is certainly wrong.
        return sender != peer or peer == "balancer" or kind == "echo.reply"
    if kind in BALANCER_ONLY:
        return peer != "balancer"
    return True  # hello twice; replies only the balancer takes


@st.composite
def bad_frames(draw: st.DrawFn) -> tuple[str, str | bytes]:
    """(peer, frame) with a frame beta must refuse."""
    peer = draw(st.sampled_from(["balancer", "alpha"]))
    for _ in range(20):
        kind = draw(st.sampled_from(["json", "mutated", "mutated", "mutated", "text", "bytes"]))
        frame: str | bytes
        if kind == "bytes":
            frame = draw(st.binary(min_size=1, max_size=60))
            text = frame.decode("utf-8", errors="replace")
        else:
            if kind == "json":
                text = json.dumps(draw(json_values))
            elif kind == "text":
                text = draw(st.text(min_size=1, max_size=60))
            else:
                text = json.dumps(draw(mutated(WS_TEMPLATES)))
            frame = text
        if must_be_refused(peer, text):
            return peer, frame
    return peer, "{still not json"


@st.composite
def bad_hellos(draw: st.DrawFn) -> str | bytes:
    """A first frame beta must refuse (anything but a hello from alpha or the balancer)."""
    kind = draw(st.sampled_from(["json", "mutated", "mutated", "stranger", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=40))
    if kind == "stranger":
        sender = draw(st.text(max_size=12) | st.sampled_from(["gamma", "beta", "mallory"]))
        text = json.dumps({"type": "hello", "sender": sender, "token": ""})
    elif kind == "json":
        text = json.dumps(draw(json_values))
    else:
        text = json.dumps(draw(mutated(WS_TEMPLATES)))
    try:
        msg = parse_message(text)
    except RemoteProtocolError:
        return text
    if msg.type == "hello" and getattr(msg, "sender", "") in ("alpha", "balancer"):
        return text + "!"
    return text


# --- the harness ----------------------------------------------------------------------------


class Harness:
    """alpha, beta, gamma and the balancer in-process and linked; plus a lone `beta` whose
    `/ws` the fuzzer talks to as the balancer and as alpha."""

    def __init__(self) -> None:
        self.topology = Topology.parse(FUZZ_TOPOLOGY)
        self.servers: dict[str, TestServer] = {}
        self.links: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self.tried: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.sentinels = 0

    async def start(self, tmp: Path) -> None:
        ports = {n: free_port() for n in [*NAMES, "balancer"]}
        peers = {n: f"ws://127.0.0.1:{ports[n]}/ws" for n in NAMES}
        for n in NAMES:
            settings = NodeSettings(name=n, topology=tmp / "t.json", peer_urls=peers)
            self.servers[n] = TestServer(create_node(settings, self.topology), port=ports[n])
        bal = BalancerSettings(
            topology=tmp / "t.json", peer_urls=peers, rebalance_interval_s=0, wave_timeout_s=5
        )
        self.servers["balancer"] = TestServer(
            create_balancer(bal, self.topology), port=ports["balancer"]
        )
        lone = NodeSettings(name="beta", topology=tmp / "t.json", flood_rate=1e9)
        self.servers["lone"] = TestServer(create_node(lone, self.topology))
        for s in self.servers.values():
            await s.start_server()
        self.http = aiohttp.ClientSession()
        deadline = time.monotonic() + 60
        while not self.linked():
            assert time.monotonic() < deadline, "the in-process cluster never linked up"
            await asyncio.sleep(0.02)

    def linked(self) -> bool:
        b = self.servers["balancer"].app[BALANCER_KEY]
        if not all(b.links.connected(n) for n in NAMES):
            return False
        alpha = self.servers["alpha"].app[SERVER_KEY]
        return all(alpha.links.connected(n) for n in ("beta", "gamma"))

    async def close(self) -> None:
        for ws in self.links.values():
            await ws.close()
        await self.http.close()
        for s in reversed(list(self.servers.values())):
            await s.close()

    # --- state ----------------------------------------------------------------------------

    def state(self) -> Any:
        """Everything a bad input could change, read directly from the apps."""
        b = self.servers["balancer"].app[BALANCER_KEY]
        out: dict[str, Any] = {"balancer": (len(b.history), sorted(b.waves), sorted(b.in_doubt))}
        for n in (*NAMES, "lone"):
            server = self.servers[n].app[SERVER_KEY]
            out[n] = (
                server.ledger.task_ids(),
                server.ledger.completed,
                dict(server.ledger._incoming),
                sorted(server.protocol.echo_waves),
                sorted(server.protocol.finn_waves),
                list(server.protocol.finished),
            )
        return out

    def invalid_total(self) -> float:
        server = self.servers["lone"].app[SERVER_KEY]
        total = 0.0
        for metric in server.metrics.invalid.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    total += sample.value
        return total

    async def echo_is_complete(self) -> bool:
        deadline = time.monotonic() + 60
        while not self.linked():
            assert time.monotonic() < deadline, "links did not come back"
            await asyncio.sleep(0.05)
        async with self.http.get(self.servers["balancer"].make_url("/api/tree")) as resp:
            tree = await resp.json()
        return tree["complete"] is True and tree["messages"] == 2 * (2 + 1)

    # --- inputs -----------------------------------------------------------------------------

    async def request(self, method: str, path: str, raw: bytes) -> None:
        url = self.servers["balancer"].make_url(path)
        headers = {"Content-Type": "application/json"}
        async with self.http.request(method, url, data=raw, headers=headers) as resp:
            text = await resp.text()
            self.tried["http"] += 1
            self.statuses[resp.status] += 1
            assert 400 <= resp.status < 500, (method, path, raw[:200], resp.status, text[:300])
            assert resp.content_type == "application/json", text[:300]
            error = json.loads(text).get("error")
            assert isinstance(error, str), text[:300]
            assert error, text[:300]

    async def link(self, peer: str) -> aiohttp.ClientWebSocketResponse:
        ws = self.links.get(peer)
        if ws is None or ws.closed:
            ws = await self.http.ws_connect(self.servers["lone"].make_url("/ws"))
            await ws.send_str(json.dumps({"type": "hello", "sender": peer, "token": ""}))
            self.links[peer] = ws
        return ws

    async def frames(self, batch: list[tuple[str, str | bytes]]) -> None:
        """Send the frames, then on each link a sentinel (an echo reply for a wave nobody
        started, named uniquely); every frame before it must have been answered with an
        error, in order."""
        sent: Counter[str] = Counter()
        for peer, frame in batch:
            ws = await self.link(peer)
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
            sent[peer] += 1
            self.tried["ws_frames"] += 1
        for peer, n in sent.items():
            ws = self.links[peer]
            self.sentinels += 1
            marker = f"sentinel-{self.sentinels}"
            state = {**ALPHA_STATE, "name": peer} if peer != "balancer" else {**ALPHA_STATE}
            state["name"] = peer if peer != "balancer" else "alpha"
            await ws.send_str(
                json.dumps(
                    {
                        "type": "echo.reply",
                        "wave": marker,
                        "sender": peer,
                        "states": [state],
                        "sent": 1,
                    }
                )
            )
            errors = 0
            while True:
                msg = await ws.receive(timeout=30)
                assert msg.type == aiohttp.WSMsgType.TEXT, (peer, msg)
                reply = json.loads(msg.data)
                assert reply["type"] == "error", (peer, reply, batch)
                if marker in reply["error"]:
                    break
                errors += 1
            assert errors == n, (peer, errors, n, batch)

    async def hello(self, first: str | bytes) -> None:
        async with self.http.ws_connect(self.servers["lone"].make_url("/ws")) as ws:
            if isinstance(first, bytes):
                await ws.send_bytes(first)
            else:
                await ws.send_str(first)
            self.tried["ws_hellos"] += 1
            msg = await ws.receive(timeout=30)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            assert json.loads(msg.data)["type"] == "error"
            while msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                msg = await ws.receive(timeout=30)
            assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


class LoopThread:
    """An event loop running in a thread of its own: the servers keep serving (and answering
    heartbeats) while hypothesis prepares the next input in the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop")

    def __enter__(self) -> LoopThread:
        self.thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def call(self, fn: Callable[[], T]) -> T:
        """Call `fn` on the loop's thread (the apps' state is only touched there)."""

        async def call() -> T:
            return fn()

        return self.run(call())

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()

        async def drain() -> None:
            await asyncio.gather(*pending, return_exceptions=True)

        self.loop.run_until_complete(drain())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def test_fuzz_balancer_api_and_node_websocket(tmp_path: Path) -> None:
    started = time.monotonic()
    h = Harness()
    with LoopThread() as lt:
        lt.run(h.start(tmp_path))
        try:
            before = lt.call(h.state)
            invalid_before = lt.call(h.invalid_total)

            @fuzz_settings(HTTP_EXAMPLES)
            @given(st.lists(bad_requests(), min_size=1, max_size=3))
            def fuzz_http(batch: list[tuple[str, str, bytes]]) -> None:
                for method, path, raw in batch:
                    lt.run(h.request(method, path, raw))
                assert lt.call(h.state) == before

            @fuzz_settings(WS_EXAMPLES)
            @given(st.lists(bad_frames(), min_size=1, max_size=5))
            def fuzz_ws(batch: list[tuple[str, str | bytes]]) -> None:
                lt.run(h.frames(batch))
                assert lt.call(h.state) == before

            @fuzz_settings(HELLO_EXAMPLES)
            @given(bad_hellos())
            def fuzz_hello(first: str | bytes) -> None:
                lt.run(h.hello(first))
                assert lt.call(h.state) == before

            fuzz_http()
            fuzz_ws()
            fuzz_hello()

            # Every bad frame and hello was counted (sentinels too: they are bad frames).
            counted = lt.call(h.invalid_total) - invalid_before
            assert counted == h.tried["ws_frames"] + h.sentinels + h.tried["ws_hellos"]
            # The servers still work: a full Echo wave through the balancer is complete.
            assert lt.run(h.echo_is_complete())
        finally:
            lt.run(h.close())
    total = sum(h.tried.values())
    report = {
        **h.tried,
        "ws_sentinels": h.sentinels,
        "total": total,
        "http_statuses": {str(k): v for k, v in sorted(h.statuses.items())},
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"\nfuzz inputs tried: {json.dumps(report)}")
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "fuzz_counts.json").write_text(json.dumps(report, indent=2) + "\n")
    assert total >= 2000
