"""A server leaving the topology, in-process: the balancer's `server.drain` requests.

`beta` (2 cpus, 5 one-hour tasks: 2 running, 3 queued) is held, refuses new work of every
kind while its state stays as it was, hands queued tasks to a server it has never heard of
(the new topology's), requeues its running tasks from scratch after the grace, keeps the
hold across a restart (persisted before answering), starts alone when the topology file no
longer names it, and starts work again when released.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from treewave.core.topology import Topology
from treewave.node.app import SERVER_KEY
from treewave.node.app import create_app as create_node
from treewave.node.settings import NodeSettings
from treewave.node.store import TaskStore, database_path

TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": 3600, "wave_timeout_s": 5},
    "servers": [
        {"name": "alpha", "cpus": 1, "children": ["beta"]},
        {"name": "beta", "cpus": 2, "tasks": 5, "children": []},
    ],
}
WITHOUT_BETA: dict[str, Any] = {
    "settings": TOPOLOGY["settings"],
    "servers": [{"name": "alpha", "cpus": 1}],
}

Client = TestClient[web.Request, web.Application]


def app(state_dir: Path, topology: dict[str, Any] = TOPOLOGY) -> web.Application:
    settings = NodeSettings(name="beta", topology=Path("topology.json"), state_dir=state_dir)
    return create_node(settings, Topology.parse(topology))


async def link(client: Client, sender: str) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect("/ws")
    await ws.send_str(json.dumps({"type": "hello", "sender": sender, "token": ""}))
    for _ in range(500):
        if client.app[SERVER_KEY].links.connected(sender):
            return ws
        await asyncio.sleep(0.01)
    raise AssertionError(f"link from {sender} never came up")


async def ask(ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any]) -> Any:
    await ws.send_str(json.dumps(frame))
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def tasks(client: Client) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get("/api/tasks")).json()
    return body


def drain(hold: bool, requeue: bool = False, seq: int = 0) -> dict[str, Any]:
    return {"type": "server.drain", "hold": hold, "requeue_running": requeue, "seq": seq}


async def test_a_held_server_drains_requeues_and_is_released(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    client: Client = await aiohttp_client(app(tmp_path))
    server = client.app[SERVER_KEY]
    for _ in range(200):
        if len(server.ledger.running) == 2:
            break
        await asyncio.sleep(0.01)
    balancer = await link(client, "balancer")

    report = await ask(balancer, drain(hold=True, seq=7))
    assert report == {
        "type": "server.drain_report",
        "held": True,
        "queued": 3,
        "running": 2,
        "reserved": 0,
        "completed": 0,
        "transferred_out": 0,
        "requeued": 0,
        "answers": 7,  # the number of the request it answers
    }
    with closing(TaskStore(database_path(tmp_path, "beta"))) as store:
        assert store.load_flags()["held"] is True  # on disk before the answer

    # No new work of any kind, and nothing changes.
    before = await tasks(client)
    task = {"id": "new-1", "duration_s": 1}
    refused = await ask(balancer, {"type": "tasks.submit", "tasks": [task]})
    assert refused["type"] == "error"
    assert "leaving the topology" in refused["error"]
    cancelled = await ask(
        balancer,
        {"type": "transfer.deliver", "transfer": "in-1", "source": "alpha", "tasks": [task]},
    )
    assert cancelled == {"type": "transfer.outcome", "transfer": "in-1", "outcome": "cancelled"}
    parent = await link(client, "alpha")
    explore = {"type": "echo.explore", "wave": "w1", "sender": "alpha", "budget_s": 5}
    assert (await ask(parent, explore))["type"] == "error"
    await parent.close()
    assert await tasks(client) == before

    # Its queued tasks go to a server of the new topology it has never heard of.
    prepared = await ask(
        balancer, {"type": "transfer.prepare", "transfer": "out-1", "target": "zeta", "count": 2}
    )
    assert len(prepared["tasks"]) == 2
    settled = await ask(balancer, {"type": "transfer.commit", "transfer": "out-1"})
    assert settled["outcome"] == "committed"

    # Past the grace: running tasks stop and are queued again; nothing starts again.
    requeue = await ask(balancer, drain(hold=True, requeue=True))
    assert (requeue["requeued"], requeue["queued"], requeue["running"]) == (2, 3, 0)
    assert requeue["transferred_out"] == 2
    await asyncio.sleep(0.2)
    now = await tasks(client)
    assert now["running"] == []
    assert len(now["queued"]) == 3

    bad = await ask(balancer, drain(hold=False, requeue=True))
    assert bad["type"] == "error"
    assert "requeue_running needs hold" in bad["error"]

    # Released (it came back in a newer topology): its slots run again.
    released = await ask(balancer, drain(hold=False))
    assert released["held"] is False
    for _ in range(200):
        if len((await tasks(client))["running"]) == 2:
            break
        await asyncio.sleep(0.01)
    assert len((await tasks(client))["running"]) == 2
    await balancer.close()


async def test_a_request_older_than_one_applied_is_answered_but_not_applied(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """A release overtaken by a newer hold (or replayed) must not lift that hold: the
    balancer may be retiring the server on the strength of the hold's answer."""
    client: Client = await aiohttp_client(app(tmp_path))
    balancer = await link(client, "balancer")
    assert (await ask(balancer, drain(hold=True, seq=7)))["held"] is True
    old_release = await ask(balancer, drain(hold=False, seq=5))
    assert (old_release["held"], old_release["answers"]) == (True, 5)
    with closing(TaskStore(database_path(tmp_path, "beta"))) as store:
        flags = store.load_flags()
        assert (flags["held"], flags["drain_seq"]) == (True, 7)
    newer = await ask(balancer, drain(hold=False, seq=8))
    assert (newer["held"], newer["answers"]) == (False, 8)
    await balancer.close()


async def test_the_hold_survives_a_restart_even_outside_the_topology(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    first: Client = await aiohttp_client(app(tmp_path))
    balancer = await link(first, "balancer")
    assert (await ask(balancer, drain(hold=True)))["held"] is True
    await balancer.close()
    await first.close()

    # Restarted with a topology that no longer names it (Compose bind-mounts the new file).
    again: Client = await aiohttp_client(app(tmp_path, WITHOUT_BETA))
    server = again.app[SERVER_KEY]
    assert server.held is True
    assert server.allowed_inbound == {"balancer"}
    assert server.cpus == 2
    await asyncio.sleep(0.2)
    left = await tasks(again)
    assert left["running"] == []
    assert len(left["queued"]) == 5  # the two that ran came back queued
    balancer = await link(again, "balancer")
    report = await ask(balancer, drain(hold=True))
    assert (report["queued"], report["running"]) == (5, 0)
    await balancer.close()


def test_a_server_outside_the_topology_without_saved_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the topology"):
        app(tmp_path, WITHOUT_BETA)
