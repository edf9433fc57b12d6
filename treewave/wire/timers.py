"""The services' timer: one event-loop timer handle armed for the earliest deadline, so
nothing wakes while nothing is due."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["DeadlineTimer"]


class DeadlineTimer:
    """Calls `fire(now)` once the earliest of `next_deadline()` (a `time.monotonic()` time,
    None when nothing is in flight) has passed. Whoever adds or removes a deadline calls
    `moved()`, which re-arms the loop's timer handle on the spot.

    No task is woken to re-arm it, and a deadline that went away (a wave that ended in
    time, the common case) is disarmed instead of waking the process to find nothing due.
    A server in a wave did both before: a task switch when the wave arrived and a wake-up
    seconds later at the deadline of a wave long over. Polling every few ms, earlier
    still, was most of an idle service's CPU, times 300 containers."""

    def __init__(
        self,
        next_deadline: Callable[[], float | None],
        fire: Callable[[float], Awaitable[None]],
    ) -> None:
        self.next_deadline = next_deadline
        self.fire = fire
        self.armed_for: float | None = None
        """The deadline the handle is armed for (None: not armed)."""
        self._handle: asyncio.TimerHandle | None = None
        self._due = asyncio.Event()
        self._running = False

    def moved(self) -> None:
        """Arm the handle for the earliest deadline now (or disarm it if there is none)."""
        if not self._running:
            return  # `run` arms it when it starts
        deadline = self.next_deadline()
        if deadline == self.armed_for:
            return
        self._disarm()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_later(max(0.0, deadline - time.monotonic()), self._came_due)
            self.armed_for = deadline

    def _came_due(self) -> None:
        self._handle = None
        self.armed_for = None
        self._due.set()

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.armed_for = None

    async def run(self) -> None:
        """Fire whenever the handle comes due, one `fire` at a time, until cancelled."""
        self._running = True
        try:
            while True:
                self.moved()
                await self._due.wait()
                self._due.clear()
                now = time.monotonic()
                deadline = self.next_deadline()
                if deadline is not None and deadline <= now:
                    await self.fire(now)
        finally:
            self._running = False
            self._disarm()
