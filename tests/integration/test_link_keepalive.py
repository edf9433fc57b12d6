"""Link liveness by the link set's own pings, over real WebSockets on loopback.

A real `treewave` server (`beta`) and a peer that accepts a link but never answers a ping
(as a frozen or cut-off process would not): one keep-alive round pings both links, the
next closes only the silent one, and the live link keeps carrying frames.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from treewave.core.messages import EchoExplore, Hello
from treewave.core.topology import Topology
from treewave.node.app import create_app as create_node
from treewave.node.settings import NodeSettings
from treewave.wire.links import LinkSet, read_frames

TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": 3600, "wave_timeout_s": 5},
    "servers": [
        {"name": "alpha", "cpus": 1, "tasks": 0, "children": ["beta"]},
        {"name": "beta", "cpus": 1, "tasks": 0, "children": []},
    ],
}


def silent_peer(accepted: asyncio.Event) -> web.Application:
    """Accepts a WebSocket and never reads from it: no pong ever comes back."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        accepted.set()
        await asyncio.sleep(3600)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    return app


async def test_a_peer_that_never_answers_a_ping_loses_its_link_and_a_live_one_keeps_it() -> None:
    node = TestServer(
        create_node(NodeSettings(name="beta", topology=Path("t.json")), Topology.parse(TOPOLOGY))
    )
    accepted = asyncio.Event()
    silent = TestServer(silent_peer(accepted))
    await node.start_server()
    await silent.start_server()
    links = LinkSet()
    frames: list[tuple[str, str]] = []

    async def on_frame(peer: str, text: str) -> None:
        frames.append((peer, text))

    try:
        async with aiohttp.ClientSession() as session:
            live = await session.ws_connect(node.make_url("/ws"), autoping=False)
            await live.send_str(Hello(sender="alpha").model_dump_json())
            dead = await session.ws_connect(silent.make_url("/ws"), autoping=False)
            await accepted.wait()
            links.attach("beta", live)
            links.attach("ghost", dead)
            readers = [
                asyncio.create_task(read_frames("beta", live, on_frame, links)),
                asyncio.create_task(read_frames("ghost", dead, on_frame, links)),
            ]

            assert await links.ping_all() == []
            assert set(links.unanswered) == {live, dead}
            for _ in range(200):  # beta's pong arrives through the reader
                if live not in links.unanswered:
                    break
                await asyncio.sleep(0.01)
            assert live not in links.unanswered, "beta never answered the ping"

            assert await links.ping_all() == ["ghost"]
            # The silent peer's reader ends at once; beta's link stays open and works.
            await asyncio.wait_for(readers[1], timeout=5)
            assert not live.closed
            explore = EchoExplore(wave="w1", sender="alpha", budget_s=5.0)
            await links.send("beta", explore)
            for _ in range(200):
                if frames:
                    break
                await asyncio.sleep(0.01)
            assert frames, "beta never answered the explore"
            assert frames[0][0] == "beta"
            assert '"echo.reply"' in frames[0][1]
            await live.close()
            await asyncio.wait_for(readers[0], timeout=5)
            await links.close_all()
    finally:
        await silent.close()
        await node.close()
