"""One server's app in-process (aiohttp test client), and a small in-process cluster.

The node under test is `beta`, a leaf whose only parent is `alpha`; `gamma` is its
sibling. Its tasks last an hour, so its queue and running set only change when a message
changes them, and any change is visible in `/api/tasks` and `/api/state`.

Every hostile frame must be answered with an error frame (or the link closed), be counted
in `treewave_node_invalid_messages_total{reason=...}`, and leave the server's state
exactly as it was; the server keeps serving and still takes part in the next Echo wave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import treewave.node.app as node_app
from tests.support.metrics import counter_by, counter_totals
from tests.support.ports import free_port
from tests.support.waiting import wait_until
from treewave.balancer.app import create_app as create_balancer
from treewave.balancer.settings import BalancerSettings
from treewave.core.messages import MAX_MESSAGE_BYTES
from treewave.core.topology import Topology
from treewave.node.app import SERVER_KEY
from treewave.node.app import create_app as create_node
from treewave.node.settings import NodeSettings

TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": 3600, "wave_timeout_s": 5},
    "servers": [
        {"name": "alpha", "cpus": 2, "tasks": 1, "children": ["beta", "gamma"]},
        {"name": "beta", "cpus": 2, "tasks": 5, "children": []},
        {"name": "gamma", "cpus": 1, "tasks": 0, "children": []},
    ],
}
NODE = "beta"

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


def node_application(name: str = NODE, topology: dict[str, Any] = TOPOLOGY) -> web.Application:
    settings = NodeSettings(name=name, topology=Path("topology.json"))
    return create_node(settings, Topology.parse(topology))


@pytest.fixture
async def client(aiohttp_client: Any) -> Client:
    c: Client = await aiohttp_client(node_application())
    return c


async def invalid_counts(client: Client) -> dict[str, float]:
    """`treewave_node_invalid_messages_total` by reason."""
    text = await (await client.get("/metrics")).text()
    return counter_by(text, "treewave_node_invalid_messages", "reason")


async def wave_message_counts(client: Client) -> dict[tuple[str, ...], float]:
    """`treewave_node_wave_messages_total` by (algorithm, direction)."""
    text = await (await client.get("/metrics")).text()
    return counter_totals(text, "treewave_node_wave_messages", "algorithm", "direction")


async def snapshot(client: Client) -> dict[str, Any]:
    """Everything observable about the server's work, plus its wave bookkeeping."""
    tasks = await (await client.get("/api/tasks")).json()
    state = await (await client.get("/api/state")).json()
    server = client.app[SERVER_KEY]
    return {
        "tasks": tasks,
        # Expected work counts down while tasks run: it changes with the clock alone.
        "state": {
            k: v for k, v in state.items() if k not in ("links", "expected_work_s", "pressure")
        },
        "echo_waves": sorted(server.protocol.echo_waves),
        "finn_waves": sorted(server.protocol.finn_waves),
        "finished": list(server.protocol.finished),
        "incoming": dict(server.ledger._incoming),
    }


async def open_link(client: Client, sender: str) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect("/ws", max_msg_size=0)
    await ws.send_str(json.dumps({"type": "hello", "sender": sender, "token": ""}))
    # The link is registered once the hello is read; wait for that before talking.
    server = client.app[SERVER_KEY]
    for _ in range(500):
        if server.links.connected(sender):
            return ws
        await asyncio.sleep(0.01)
    raise AssertionError(f"link from {sender} never came up")


async def next_frame(ws: aiohttp.ClientWebSocketResponse, limit_s: float = 10.0) -> Any:
    msg = await ws.receive(timeout=limit_s)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type}"
    return json.loads(msg.data)


async def echo_takes_part(client: Client, wave: str = "after-1") -> None:
    """Beta's only Echo neighbour is alpha: an explore from alpha is answered at once with
    beta's own state (a complete wave as far as beta is concerned)."""
    ws = await open_link(client, "alpha")
    try:
        await ws.send_str(
            json.dumps({"type": "echo.explore", "wave": wave, "sender": "alpha", "budget_s": 5})
        )
        reply = await next_frame(ws)
    finally:
        await ws.close()
    assert reply["type"] == "echo.reply", reply
    assert reply["sender"] == NODE
    assert [s["name"] for s in reply["states"]] == [NODE]
    assert reply["states"][0]["echo_parent"] == "alpha"
    assert reply["sent"] == 1


CLOSED_TYPES = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


ALPHA_STATE = {"name": "alpha", "cpus": 2, "running": 0, "queued": 0, "completed": 0}

# (name, sender of the hello, frame, metric reason, words the error must contain)
BAD_FRAMES: list[tuple[str, str, str | bytes, str, str]] = [
    ("not json", "balancer", "{this is not json", "malformed_json", "invalid message"),
    ("binary garbage", "balancer", b"\xff\xfe\x00garbage", "malformed_json", "invalid message"),
    ("json array", "balancer", "[1, 2, 3]", "invalid_fields", "should be an object"),
    ("json number", "balancer", "42", "invalid_fields", "should be an object"),
    ("json null", "balancer", "null", "invalid_fields", "should be an object"),
    ("no type", "balancer", '{"wave": "w"}', "unknown_type", "type"),
    ("unknown type", "balancer", '{"type": "tasks.steal"}', "unknown_type", "type"),
    (
        "wrong-typed explore",
        "alpha",
        '{"type": "echo.explore", "wave": 12, "sender": "alpha", "budget_s": "soon"}',
        "invalid_fields",
        "budget_s",
    ),
    (
        "wrong-typed finn",
        "alpha",
        json.dumps(
            {
                "type": "finn",
                "wave": "f1",
                "sender": "alpha",
                "inc": "alpha",
                "ninc": [],
                "dec": [],
                "work": {},
                "budget_s": 1,
            }
        ),
        "invalid_fields",
        "dec",
    ),
    (
        "unknown field",
        "balancer",
        '{"type": "transfer.commit", "transfer": "x1", "extra": true}',
        "invalid_fields",
        "unknown field",
    ),
    (
        "negative count",
        "balancer",
        '{"type": "transfer.prepare", "transfer": "x1", "target": "gamma", "count": -5}',
        "invalid_fields",
        "count",
    ),
    (
        "unknown wave's echo reply",
        "alpha",
        json.dumps(
            {"type": "echo.reply", "wave": "nowave", "sender": "alpha", "states": [ALPHA_STATE]}
            | {"sent": 1}
        ),
        "unknown_wave",
        "unknown wave",
    ),
    (
        "sender differs from hello",
        "balancer",
        '{"type": "echo.explore", "wave": "w2", "sender": "alpha", "budget_s": 1}',
        "sender_mismatch",
        "claiming",
    ),
    (
        "explore from a non-neighbour",
        "balancer",
        '{"type": "echo.explore", "wave": "w3", "sender": "balancer", "budget_s": 1}',
        "not_neighbour",
        "not a neighbour",
    ),
    (
        "inconsistent finn sets",
        "alpha",
        json.dumps(
            {
                "type": "finn",
                "wave": "f2",
                "sender": "alpha",
                "inc": ["alpha"],
                "ninc": ["alpha", "beta", "gamma"],
                "dec": {"alpha": 1},
                "work": {"tasks_per_node": 5},
                "budget_s": 1,
            }
        ),
        "invalid_fields",
        "inconsistent",
    ),
    (
        "transfer.prepare from a parent",
        "alpha",
        '{"type": "transfer.prepare", "transfer": "x2", "target": "gamma", "count": 3}',
        "not_allowed",
        "only accepted from the balancer",
    ),
    (
        "transfer.deliver from a parent",
        "alpha",
        json.dumps(
            {
                "type": "transfer.deliver",
                "transfer": "x3",
                "source": "alpha",
                "tasks": [{"id": "evil.1", "duration_s": 1}],
            }
        ),
        "not_allowed",
        "only accepted from the balancer",
    ),
    (
        "tasks.submit from a parent",
        "alpha",
        '{"type": "tasks.submit", "tasks": [{"id": "evil.2", "duration_s": 1}]}',
        "not_allowed",
        "only accepted from the balancer",
    ),
    (
        "transfer to itself",
        "balancer",
        '{"type": "transfer.prepare", "transfer": "x4", "target": "beta", "count": 3}',
        "invalid_fields",
        "not another server",
    ),
    (
        "hello twice",
        "balancer",
        '{"type": "hello", "sender": "balancer", "token": ""}',
        "unexpected_type",
        "hello sent twice",
    ),
    (
        "a reply only the balancer takes",
        "balancer",
        '{"type": "transfer.outcome", "transfer": "x5", "outcome": "accepted"}',
        "unexpected_type",
        "not a request",
    ),
]


async def test_routes_answer(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    state = await (await client.get("/api/state")).json()
    assert state["name"] == NODE
    assert state["cpus"] == 2
    assert state["running"] + state["queued"] == 5
    tasks = await (await client.get("/api/tasks")).json()
    assert len(tasks["running"]) + len(tasks["queued"]) == 5
    metrics = await (await client.get("/metrics")).text()
    assert 'treewave_node_queued{server="beta"} 3.0' in metrics


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/api/state/extra", 404),
        ("POST", "/api/state", 405),
        ("POST", "/api/tasks", 405),
        ("DELETE", "/healthz", 405),
        ("PUT", "/metrics", 405),
        ("GET", "/ws", 400),  # not a WebSocket upgrade
    ],
)
async def test_bad_http_requests(client: Client, method: str, path: str, status: int) -> None:
    before = await snapshot(client)
    resp = await client.request(method, path, data=b'{"x": 1}')
    assert resp.status == status
    body = await resp.json(content_type=None)
    assert isinstance(body.get("error"), str)
    assert body["error"]
    assert await snapshot(client) == before


@pytest.mark.parametrize(
    ("sender", "frame", "reason", "words"),
    [case[1:] for case in BAD_FRAMES],
    ids=[case[0] for case in BAD_FRAMES],
)
async def test_bad_frame_is_answered_counted_and_changes_nothing(
    client: Client, sender: str, frame: str | bytes, reason: str, words: str
) -> None:
    before = await snapshot(client)
    counts = await invalid_counts(client)
    ws = await open_link(client, sender)
    if isinstance(frame, bytes):
        await ws.send_bytes(frame)
    else:
        await ws.send_str(frame)
    reply = await next_frame(ws)
    assert reply["type"] == "error"
    assert words in reply["error"], reply
    # The link stays usable after an error: a second bad frame is answered too.
    await ws.send_str("{still not json")
    assert (await next_frame(ws))["type"] == "error"
    await ws.close()
    expected = dict(counts)
    expected[reason] = expected.get(reason, 0) + 1
    expected["malformed_json"] = expected.get("malformed_json", 0) + 1
    assert await invalid_counts(client) == expected
    assert (await client.get("/healthz")).status == 200
    assert await snapshot(client) == before
    await echo_takes_part(client)


# (name, first frame, words the refusal must contain)
BAD_HELLOS: list[tuple[str, str | bytes, str]] = [
    ("stranger", '{"type": "hello", "sender": "mallory", "token": ""}', "not a parent"),
    ("sibling", '{"type": "hello", "sender": "gamma", "token": ""}', "not a parent"),
    ("itself", '{"type": "hello", "sender": "beta", "token": ""}', "not a parent"),
    ("not json", "hello, it's me", "invalid message"),
    ("binary", b"\x00\x01", "text hello"),
    ("empty sender", '{"type": "hello", "sender": "", "token": ""}', "sender"),
    ("unknown field", '{"type": "hello", "sender": "alpha", "role": "admin"}', "unknown field"),
    (
        "a request instead of hello",
        '{"type": "transfer.prepare", "transfer": "x", "target": "gamma", "count": 1}',
        "must be hello",
    ),
]


@pytest.mark.parametrize(
    ("first", "words"), [c[1:] for c in BAD_HELLOS], ids=[c[0] for c in BAD_HELLOS]
)
async def test_bad_hello_is_refused(client: Client, first: str | bytes, words: str) -> None:
    before = await snapshot(client)
    counts = await invalid_counts(client)
    ws = await client.ws_connect("/ws")
    if isinstance(first, bytes):
        await ws.send_bytes(first)
    else:
        await ws.send_str(first)
    reply = await next_frame(ws)
    assert reply["type"] == "error"
    assert words in reply["error"], reply
    closing = await ws.receive(timeout=10)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    after = await invalid_counts(client)
    assert after.get("bad_hello", 0) == counts.get("bad_hello", 0) + 1
    assert not client.app[SERVER_KEY].links.peers
    assert await snapshot(client) == before
    await echo_takes_part(client)


async def test_no_hello_times_out(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_app, "HELLO_TIMEOUT_S", 0.3)
    before = await snapshot(client)
    ws = await client.ws_connect("/ws")
    closing = await ws.receive(timeout=10)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert (await invalid_counts(client)).get("no_hello") == 1
    assert await snapshot(client) == before
    await echo_takes_part(client)


async def test_oversized_frame_closes_the_link(client: Client) -> None:
    before = await snapshot(client)
    ws = await open_link(client, "balancer")
    frame = '{"type": "tasks.submit", "tasks": [], "pad": "' + "x" * MAX_MESSAGE_BYTES + '"}'
    # The server may drop the connection before the whole frame is written.
    with contextlib.suppress(ConnectionError):
        await ws.send_str(frame)
    closing = await ws.receive(timeout=30)
    assert closing.type in CLOSED_TYPES
    await ws.close()
    await wait_until(lambda: not client.app[SERVER_KEY].links.peers, "the link to close")
    assert (await invalid_counts(client)).get("too_large") == 1
    assert (await client.get("/healthz")).status == 200
    assert await snapshot(client) == before
    await echo_takes_part(client)


async def test_replayed_and_unknown_transfers_change_nothing(client: Client) -> None:
    """Valid but pointless requests: commits and aborts of transfers nobody prepared are
    answered `unknown`; they move no task."""
    before = await snapshot(client)
    ws = await open_link(client, "balancer")
    for kind in ("transfer.commit", "transfer.abort", "transfer.commit"):
        await ws.send_str(json.dumps({"type": kind, "transfer": "ghost-1"}))
        reply = await next_frame(ws)
        assert reply == {"type": "transfer.settled", "transfer": "ghost-1", "outcome": "unknown"}
    await ws.close()
    assert await snapshot(client) == before


async def test_transfer_deliver_is_idempotent(client: Client) -> None:
    ws = await open_link(client, "balancer")
    deliver = {
        "type": "transfer.deliver",
        "transfer": "xfer-7",
        "source": "alpha",
        "tasks": [{"id": "moved.1", "duration_s": 3600}, {"id": "moved.2", "duration_s": 3600}],
    }
    for _ in range(3):
        await ws.send_str(json.dumps(deliver))
        reply = await next_frame(ws)
        assert reply == {"type": "transfer.outcome", "transfer": "xfer-7", "outcome": "accepted"}
    # A cancel after delivery cannot take it back.
    await ws.send_str(json.dumps({"type": "transfer.cancel", "transfer": "xfer-7"}))
    assert (await next_frame(ws))["outcome"] == "accepted"
    await ws.close()
    tasks = await (await client.get("/api/tasks")).json()
    everywhere = tasks["queued"] + tasks["running"]
    assert everywhere.count("moved.1") == 1
    assert everywhere.count("moved.2") == 1
    assert len(everywhere) == 7


# --- node + balancer in-process --------------------------------------------------------------


@pytest.fixture
async def mini_cluster(tmp_path: Path) -> AsyncIterator[dict[str, TestServer]]:
    """alpha, beta, gamma and the balancer as four apps on one event loop."""
    topo = {**TOPOLOGY, "settings": {"task_time_s": 0.2, "wave_timeout_s": 5}}
    topology = Topology.parse(topo)
    names = list(topology.names)
    ports = {n: free_port() for n in [*names, "balancer"]}
    peers = {n: f"ws://127.0.0.1:{ports[n]}/ws" for n in names}
    servers: dict[str, TestServer] = {}
    for n in names:
        settings = NodeSettings(name=n, topology=tmp_path / "t.json", peer_urls=peers)
        servers[n] = TestServer(create_node(settings, topology), port=ports[n])
    bal = BalancerSettings(topology=tmp_path / "t.json", peer_urls=peers, rebalance_interval_s=0)
    servers["balancer"] = TestServer(create_balancer(bal, topology), port=ports["balancer"])
    try:
        for s in servers.values():
            await s.start_server()
        async with aiohttp.ClientSession() as http:

            async def linked() -> bool:
                url = servers["balancer"].make_url("/healthz")
                if (await (await http.get(url)).json())["links_up"] != len(names):
                    return False
                for n in names:
                    state = await (await http.get(servers[n].make_url("/api/state"))).json()
                    if not all(state["links"].values()):
                        return False
                return True

            for _ in range(1500):
                if await linked():
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the cluster never linked up")
        yield servers
    finally:
        for s in reversed(list(servers.values())):
            await s.close()


async def test_in_process_cluster_echo_finn_and_rebalance(
    mini_cluster: dict[str, TestServer],
) -> None:
    bal = mini_cluster["balancer"]
    async with aiohttp.ClientSession() as http:
        tree = await (await http.get(bal.make_url("/api/tree"))).json()
        assert tree["complete"] is True
        assert tree["messages"] == 2 * (2 + 1)
        assert {n["name"]: n["echo_parent"] for n in tree["nodes"]} == {
            "alpha": "balancer",
            "beta": "alpha",
            "gamma": "alpha",
        }
        finn = await (await http.post(bal.make_url("/api/finn"), json={"tasks_per_node": 2})).json()
        assert finn["complete"] is True
        assert finn["decided"] == ["alpha", "beta", "gamma"]
        assert finn["messages"] == 2 + 1 + 2  # a tree: one message per directed edge
        resp = await http.post(
            bal.make_url("/api/tasks"), json={"node": "gamma", "count": 12, "duration_s": 0.2}
        )
        assert resp.status == 202
        rebalance = await (await http.post(bal.make_url("/api/rebalance"), json={})).json()
        assert rebalance["moves"], rebalance
        assert all(m["source"] == "gamma" for m in rebalance["moves"])
        assert rebalance["max_pressure_after"] < rebalance["max_pressure_before"]
        expected = 1 + 5 + 0 + 3 * 2 + 12
        for _ in range(1000):
            done = 0
            for n in ("alpha", "beta", "gamma"):
                tasks = await (await http.get(mini_cluster[n].make_url("/api/tasks"))).json()
                done += len(tasks["completed"])
            if done >= expected:
                break
            await asyncio.sleep(0.05)
        assert done == expected


async def test_a_child_without_a_link_does_not_hold_the_wave(aiohttp_client: Any) -> None:
    """Alpha's children are not running, so its explores to them cannot go out: alpha
    answers the balancer at once with its own state (the wave partial above it) instead
    of after the explore's hour-long budget. A cluster's first wave, started before every
    link was up, used to hold the periodic rebalancing for the whole deadline."""
    client: Client = await aiohttp_client(node_application("alpha"))
    ws = await open_link(client, "balancer")
    try:
        explore = {"type": "echo.explore", "wave": "w1", "sender": "balancer", "budget_s": 3600}
        await ws.send_str(json.dumps(explore))
        reply = await next_frame(ws)
    finally:
        await ws.close()
    assert reply["type"] == "echo.reply", reply
    assert [s["name"] for s in reply["states"]] == ["alpha"]
    assert reply["sent"] == 1  # its reply: the two explores never went out
    assert "w1" not in client.app[SERVER_KEY].protocol.echo_waves


async def test_wave_messages_are_counted_in_metrics(client: Client) -> None:
    """Every wave message in and out shows in `/metrics`, by algorithm and direction."""
    zero = {(a, d): 0.0 for a in ("echo", "finn") for d in ("in", "out")}
    assert await wave_message_counts(client) == zero
    ws = await open_link(client, "alpha")
    try:
        for wave in ("w1", "w2"):
            explore = {"type": "echo.explore", "wave": wave, "sender": "alpha", "budget_s": 5}
            await ws.send_str(json.dumps(explore))
            assert (await next_frame(ws))["type"] == "echo.reply"
    finally:
        await ws.close()
    assert await wave_message_counts(client) == {**zero, ("echo", "in"): 2, ("echo", "out"): 2}
