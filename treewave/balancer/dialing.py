"""The balancer's links: one dialling task per server it keeps a link to (the topology's,
and those retiring or being released), redialled forever, over one HTTP session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from treewave.balancer.settings import BalancerSettings
from treewave.balancer.statefile import reread_peers
from treewave.core.topology import BALANCER
from treewave.wire.addressing import peer_url
from treewave.wire.links import LinkSet, dial_forever

__all__ = ["Dialers"]

log = logging.getLogger("treewave.balancer")


class Dialers:
    """Dials the servers named to `sync`, hands their frames to `on_frame`."""

    def __init__(
        self,
        settings: BalancerSettings,
        links: LinkSet,
        on_frame: Callable[[str, str], Awaitable[None]],
        on_link_up: Callable[[str], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.links = links
        self.on_frame = on_frame
        self.on_link_up = on_link_up
        self.peer_urls = dict(settings.peer_urls)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        # No connection limit: every open link holds one of the session's connections, and
        # aiohttp's default of 100 left a 300-server balancer with 100 links (Finn partial).
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    def reread_peers(self) -> None:
        """Local mode writes the added servers' URLs into the peers file before posting."""
        if self.settings.peers_file is not None:
            self.peer_urls = reread_peers(self.settings.peers_file, self.peer_urls)

    def sync(self, names: tuple[str, ...]) -> None:
        """Dial every server newly named; drop the links to those no longer named."""
        if self.session is None:
            return
        for name in sorted(set(self.tasks) - set(names)):
            self.tasks.pop(name).cancel()
            log.info("link to %s dropped (retired)", name)
        for name in names:
            if name in self.tasks:
                continue
            url = peer_url(name, self.settings.peer_url_template, self.peer_urls)
            self.tasks[name] = asyncio.create_task(
                dial_forever(
                    self.session,
                    name,
                    url,
                    BALANCER,
                    self.settings.secret,
                    self.links,
                    self.on_frame,
                    self.on_link_up,
                ),
                name=f"balancer-link-{name}",
            )

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.links.close_all()
        if self.session is not None:
            await self.session.close()
            self.session = None
