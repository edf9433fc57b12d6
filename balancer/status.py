"""The live status page at `/` (issue 5 fills this in)."""

from __future__ import annotations

from aiohttp import web


def setup_status(app: web.Application) -> None:
    """Add the status page routes to the balancer's app."""
