"""Link authentication by challenge-response, over real WebSockets on loopback.

`beta` (a leaf whose parent is `alpha`) serves on a real port with a deployment secret.
The genuine `alpha` dials it with the real link code through a relay that records every
frame it carries, as a sniffer on the network would. A third party then replays the
recorded hello on a link of its own: the server's fresh nonce makes it worthless, so the
link is refused, counted, and nothing changes. Once in, a link is held to the server's
flood limit (a token bucket per link): a peer that floods it is throttled, not served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from treewave.core.topology import Topology
from treewave.node.app import SERVER_KEY, Server
from treewave.node.app import create_app as create_node
from treewave.node.settings import NodeSettings
from treewave.wire.auth import hello_proof
from treewave.wire.links import LinkSet, dial_forever

SECRET = "correct-horse-battery-staple-42"
TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": 3600, "wave_timeout_s": 5},
    "servers": [
        {"name": "alpha", "cpus": 1, "tasks": 0, "children": ["beta"]},
        {"name": "beta", "cpus": 1, "tasks": 2, "children": []},
    ],
}
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


def recording_relay(target: str, recorded: list[str]) -> web.Application:
    """Forwards one WebSocket both ways to `target`, keeping the dialer's text frames."""

    async def relay(request: web.Request) -> web.WebSocketResponse:
        inbound = web.WebSocketResponse()
        await inbound.prepare(request)
        async with aiohttp.ClientSession() as session, session.ws_connect(target) as outbound:

            async def upstream() -> None:
                async for frame in inbound:
                    recorded.append(frame.data)
                    await outbound.send_str(frame.data)
                await outbound.close()

            async def downstream() -> None:
                async for frame in outbound:
                    await inbound.send_str(frame.data)
                await inbound.close()

            await asyncio.gather(upstream(), downstream())
        return inbound

    app = web.Application()
    app.router.add_get("/ws", relay)
    return app


def invalid_count(server: Server, reason: str) -> float:
    """Frames (and handshakes) `server` refused for `reason`."""
    value: float = server.metrics.invalid.labels(server.name, reason)._value.get()
    return value


async def bad_hello_count(server: Server) -> float:
    return invalid_count(server, "bad_hello")


async def answer_challenge(ws: aiohttp.ClientWebSocketResponse, secret: str = SECRET) -> str:
    """Read beta's challenge and answer it as alpha would, under `secret`; the nonce."""
    nonce: str = json.loads((await ws.receive(timeout=10)).data)["nonce"]
    proof = hello_proof(secret, nonce, "alpha", "beta")
    await ws.send_str(json.dumps({"type": "hello", "sender": "alpha", "token": proof}))
    return nonce


async def wait_until(condition: Any, what: str, limit_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_recorded_hello_replayed_by_a_third_party_is_refused() -> None:
    settings = NodeSettings(name="beta", topology=Path("topology.json"), secret=SECRET)
    node = TestServer(create_node(settings, Topology.parse(TOPOLOGY)))
    await node.start_server()
    server = node.app[SERVER_KEY]
    node_url = str(node.make_url("/ws"))
    recorded: list[str] = []
    relay = TestServer(recording_relay(node_url, recorded))
    await relay.start_server()
    session = aiohttp.ClientSession()
    try:
        # The genuine parent gets in through the sniffing relay.
        links = LinkSet()

        async def ignore(peer: str, text: str) -> None:
            pass

        alpha = asyncio.create_task(
            dial_forever(
                session, "beta", str(relay.make_url("/ws")), "alpha", SECRET, links, ignore
            )
        )
        await wait_until(lambda: server.links.connected("alpha"), "alpha's link to beta")
        alpha.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await alpha
        await links.close_all()
        await wait_until(lambda: not server.links.connected("alpha"), "alpha's link to close")
        sniffed = json.loads(recorded[0])
        assert sniffed["type"] == "hello"
        assert sniffed["sender"] == "alpha"
        assert len(sniffed["token"]) == 64, sniffed  # a real proof, not an empty token

        # A third party replays it on a link of its own: a new challenge, the old answer.
        before_tasks = await (await session.get(node.make_url("/api/tasks"))).json()
        refused_before = await bad_hello_count(server)
        async with session.ws_connect(node_url) as ws:
            challenge = json.loads((await ws.receive(timeout=10)).data)
            assert challenge["type"] == "challenge"
            await ws.send_str(recorded[0])
            answer = await ws.receive(timeout=10)
            assert answer.type == aiohttp.WSMsgType.TEXT
            assert "did not answer the challenge" in json.loads(answer.data)["error"]
            assert (await ws.receive(timeout=10)).type in CLOSED
        assert not server.links.connected("alpha")
        assert await bad_hello_count(server) == refused_before + 1
        after_tasks = await (await session.get(node.make_url("/api/tasks"))).json()
        assert after_tasks == before_tasks

        # Whoever holds the secret answers the new nonce and is let in: the refusal above
        # was about the replay, not about the link.
        async with session.ws_connect(node_url) as ws:
            assert await answer_challenge(ws) != challenge["nonce"]
            await wait_until(lambda: server.links.connected("alpha"), "the answered link")
    finally:
        await session.close()
        await relay.close()
        await node.close()


async def test_a_dialer_without_the_secret_is_refused() -> None:
    settings = NodeSettings(name="beta", topology=Path("topology.json"), secret=SECRET)
    node = TestServer(create_node(settings, Topology.parse(TOPOLOGY)))
    await node.start_server()
    server = node.app[SERVER_KEY]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(node.make_url("/ws")) as ws,
        ):
            await answer_challenge(ws, "another-deployment-secret")
            answer = json.loads((await ws.receive(timeout=10)).data)
            assert "did not answer the challenge" in answer["error"]
        assert not server.links.connected("alpha")
        assert await bad_hello_count(server) == 1
    finally:
        await node.close()


async def test_a_web_page_cannot_open_a_link_even_without_a_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Browsers apply no same-origin rule to WebSockets but always send Origin; a page
    # must not become "the balancer" of a server, even one run without a secret.
    settings = NodeSettings(name="beta", topology=Path("topology.json"))
    node = TestServer(create_node(settings, Topology.parse(TOPOLOGY)))
    await node.start_server()
    server = node.app[SERVER_KEY]
    try:
        async with aiohttp.ClientSession() as session:
            with contextlib.suppress(aiohttp.WSServerHandshakeError):
                async with session.ws_connect(
                    node.make_url("/ws"), headers={"Origin": "http://evil.example"}
                ):
                    raise AssertionError("a link with an Origin was accepted")
            async with session.get(
                node.make_url("/ws"),
                headers={
                    "Origin": "http://evil.example",
                    "Connection": "Upgrade",
                    "Upgrade": "websocket",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                },
            ) as response:
                assert response.status == 403
                assert "web pages" in (await response.json())["error"]
            # The same handshake without Origin (as treewave's own links) is accepted.
            async with session.ws_connect(node.make_url("/ws")) as ws:
                await ws.send_str(json.dumps({"type": "hello", "sender": "alpha"}))
                for _ in range(100):
                    if server.links.connected("alpha"):
                        break
                    await asyncio.sleep(0.02)
                assert server.links.connected("alpha")
        assert invalid_count(server, "cross_origin") == 2
        # Both counted, logged once: a page opening links in a loop cannot flood the log.
        refusals = [r for r in caplog.records if "from a web page" in r.getMessage()]
        assert len(refusals) == 1
    finally:
        await node.close()


async def test_a_peer_flooding_its_link_is_throttled_and_nothing_changes() -> None:
    """`alpha` (authenticated) sends 400 frames at once to a server allowed 50 frames a
    second per link (a burst of 100): the frames beyond the bucket are dropped unread and
    counted as `flood`, those within it are handled (here: answered with an error); the
    server's state is unchanged and, once the bucket refills, the same link is served
    again."""
    settings = NodeSettings(
        name="beta", topology=Path("topology.json"), secret=SECRET, flood_rate=50
    )
    node = TestServer(create_node(settings, Topology.parse(TOPOLOGY)))
    await node.start_server()
    server = node.app[SERVER_KEY]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(node.make_url("/ws")) as ws,
        ):
            await answer_challenge(ws)
            await wait_until(lambda: server.links.connected("alpha"), "alpha's link")
            before = await (await session.get(node.make_url("/api/tasks"))).json()

            for _ in range(400):
                await ws.send_str("{}")  # not a message: answered with an error if read

            def counted() -> float:
                return invalid_count(server, "flood") + invalid_count(server, "unknown_type")

            await wait_until(lambda: counted() >= 400, "every frame counted")
            flooded = invalid_count(server, "flood")
            handled = invalid_count(server, "unknown_type")
            assert counted() == 400
            # The burst of 100, plus 50 a second while the 400 frames are read (a fraction
            # of a second; bounded loosely for a busy machine).
            assert 100 <= handled <= 300, (handled, flooded)
            assert flooded == 400 - handled
            answers = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    frame = await ws.receive(timeout=1)
                    assert frame.type == aiohttp.WSMsgType.TEXT, frame
                    assert "error" in json.loads(frame.data)
                    answers += 1
            assert answers == handled  # only what was read was answered
            after = await (await session.get(node.make_url("/api/tasks"))).json()
            assert after == before

            # The bucket refills: the same link is served again.
            await asyncio.sleep(1.0)
            await ws.send_str("{}")
            reply = json.loads((await ws.receive(timeout=10)).data)
            assert "error" in reply
            assert invalid_count(server, "unknown_type") == handled + 1
            assert server.links.connected("alpha")
    finally:
        await node.close()
