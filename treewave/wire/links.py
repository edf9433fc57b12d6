"""Named WebSocket links: who is connected, and sending to them by name."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import weakref
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp
from aiohttp import web

from treewave.core.errors import RemoteProtocolError
from treewave.core.messages import MAX_MESSAGE_BYTES, Model, encode
from treewave.wire.auth import dialer_hello

__all__ = [
    "DEFAULT_PEER_TEMPLATE",
    "HEARTBEAT_S",
    "FrameHandler",
    "LinkSet",
    "Socket",
    "dial_forever",
    "read_frames",
]

log = logging.getLogger(__name__)

DEFAULT_PEER_TEMPLATE = "ws://{name}:8000/ws"
"""Where a server's links are found by default: its compose service name, port 8000."""

HEARTBEAT_S = 15.0
"""Seconds between ping rounds over every link (both ends, `LinkSet.keep_alive`). A link
whose peer vanished without closing it (a killed container) is closed within twice this,
30 s (as with aiohttp's 20 s heartbeat before); a 300-server stack has 600+ links, so
pings every few seconds would be a steady cost for no gain."""

FrameHandler = Callable[[str, str], Awaitable[None]]
"""Called with (peer name, frame text) for every text frame a peer sends."""


class Socket(Protocol):
    @property
    def closed(self) -> bool: ...

    async def send_str(self, data: str, compress: int | None = None) -> None: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...

    async def ping(self, message: bytes = ...) -> None: ...


class LinkSet:
    """The open links of one service, by peer name. Every socket is also kept in a
    WeakSet so shutdown can close whatever is still open.

    Liveness is the set's own (`keep_alive`), not aiohttp's `heartbeat`: that one re-arms
    a timer through an extra event-loop callback on every frame received, the largest
    per-frame cost of the link layer; pinging every link on a fixed period costs nothing
    per frame."""

    def __init__(self) -> None:
        self.peers: dict[str, Socket] = {}
        self.sockets: weakref.WeakSet[Socket] = weakref.WeakSet()
        self.dropped = 0
        self.unanswered: weakref.WeakSet[Socket] = weakref.WeakSet()
        """Links pinged whose pong has not come back yet."""
        self._closing: set[asyncio.Task[bool]] = set()

    def attach(self, name: str, ws: Socket) -> Socket | None:
        """Register `ws` as the link to `name`; returns the socket it replaces."""
        old = self.peers.get(name)
        self.peers[name] = ws
        self.sockets.add(ws)
        return old if old is not ws else None

    def detach(self, name: str, ws: Socket) -> None:
        if self.peers.get(name) is ws:
            del self.peers[name]

    def connected(self, name: str) -> bool:
        ws = self.peers.get(name)
        return ws is not None and not ws.closed

    async def send(self, name: str, message: Model) -> bool:
        """Send one message; False (and counted) when `name` has no open link."""
        ws = self.peers.get(name)
        if ws is None or ws.closed:
            self.dropped += 1
            return False
        try:
            await ws.send_str(encode(message))
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            log.debug("send to %s failed: %s", name, exc)
            self.dropped += 1
            return False
        return True

    def answered(self, ws: Socket) -> None:
        """A pong came back on `ws`: its peer is alive."""
        self.unanswered.discard(ws)

    async def ping_all(self) -> list[str]:
        """One keep-alive round: close every link whose peer has not answered the previous
        round's ping, ping the others. Returns the names of the links closed."""
        dead = []
        for name, ws in list(self.peers.items()):
            if ws.closed:
                continue
            if ws in self.unanswered:
                self.unanswered.discard(ws)
                dead.append(name)
                # Its reader ends at once (aiohttp hands it a closing message); the close
                # handshake with a peer that does not answer waits in the background.
                task = asyncio.create_task(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                continue
            self.unanswered.add(ws)
            try:
                await ws.ping()
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                log.debug("ping to %s failed: %s", name, exc)
        if dead:
            log.warning("closed links whose peer did not answer a ping: %s", ", ".join(dead))
        return dead

    async def keep_alive(self, interval_s: float = HEARTBEAT_S) -> None:
        """Ping every link each `interval_s`; a peer silent for a whole round (frozen,
        killed without closing, cut off) has its link closed, and a dialer redials it."""
        while True:
            await asyncio.sleep(interval_s)
            await self.ping_all()

    async def close_all(self) -> None:
        for ws in list(self.sockets):
            if not ws.closed:
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"shutdown")
        self.peers.clear()


async def read_frames(
    name: str,
    ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    on_frame: FrameHandler,
    links: LinkSet,
) -> BaseException | None:
    """The one reader of a socket (opened with `autoping=False`): hands text frames to
    `on_frame`, answers pings and tells `links` of pongs, until it closes. Returns the
    error that ended the link (e.g. a frame over the size limit), if any."""
    async for frame in ws:
        if frame.type == aiohttp.WSMsgType.TEXT:
            await on_frame(name, frame.data)
        elif frame.type == aiohttp.WSMsgType.BINARY:
            await on_frame(name, frame.data.decode("utf-8", errors="replace"))
        elif frame.type == aiohttp.WSMsgType.PING:
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await ws.pong(frame.data)
        elif frame.type == aiohttp.WSMsgType.PONG:
            links.answered(ws)
        elif frame.type == aiohttp.WSMsgType.ERROR:
            error: BaseException | None = frame.data or ws.exception()
            log.debug("link %s error: %s", name, error)
            return error
    return None


async def dial_forever(
    session: aiohttp.ClientSession,
    name: str,
    url: str,
    sender: str,
    secret: str,
    links: LinkSet,
    on_frame: FrameHandler,
    on_up: Callable[[str], Awaitable[None]] | None = None,
    min_backoff: float = 0.05,
    max_backoff: float = 2.0,
) -> None:
    """Keep a link to `name` open: connect, answer its challenge with a hello as `sender`
    (proving `secret`), read until it drops, reconnect with jittered exponential backoff.
    Runs until cancelled."""
    backoff = min_backoff
    while True:
        try:
            async with session.ws_connect(
                url, max_msg_size=MAX_MESSAGE_BYTES, autoping=False
            ) as ws:
                await ws.send_str(encode(await dialer_hello(ws, sender, name, secret)))
                old = links.attach(name, ws)
                if old is not None:
                    await old.close()
                backoff = min_backoff
                log.info("link to %s up (%s)", name, url)
                if on_up is not None:
                    await on_up(name)
                try:
                    await read_frames(name, ws, on_frame, links)
                finally:
                    links.detach(name, ws)
                log.info("link to %s closed", name)
        except (TimeoutError, aiohttp.ClientError, OSError, RemoteProtocolError) as exc:
            log.debug("dial %s (%s) failed: %s", name, url, exc)
        await asyncio.sleep(backoff * (0.5 + random.random()))
        backoff = min(max_backoff, backoff * 2)
