"""Sleeping until a deadline or an earlier wake-up, as the services' timer loops do."""

from __future__ import annotations

import asyncio
import time


async def sleep_until(deadline: float, wake: asyncio.Event) -> None:
    """Return at `deadline` (a `time.monotonic()` time) or as soon as `wake` is set,
    whichever comes first. One timer handle and no task: `asyncio.wait_for` wraps the wait
    in a new task on every call, and a server's timer loop sleeps anew each time a wave
    starts there."""
    handle = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), wake.set)
    try:
        await wake.wait()
    finally:
        handle.cancel()
