"""The services' `DeadlineTimer`: fires once the earliest deadline passes, re-arms when
deadlines come and go, and never wakes for a deadline that went away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from treewave.wire.timers import DeadlineTimer


class Deadlines:
    """A set of deadlines and a record of every firing."""

    def __init__(self) -> None:
        self.pending: set[float] = set()
        self.fired: list[float] = []

    def next(self) -> float | None:
        return min(self.pending, default=None)

    async def fire(self, now: float) -> None:
        self.fired.append(now)
        self.pending = {d for d in self.pending if d > now}


@contextlib.asynccontextmanager
async def running(deadlines: Deadlines) -> AsyncIterator[DeadlineTimer]:
    """A timer over `deadlines` with its loop running; stopped (cancelled) on the way out."""
    timer = DeadlineTimer(deadlines.next, deadlines.fire)
    task = asyncio.create_task(timer.run())
    await asyncio.sleep(0)
    try:
        yield timer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_fires_after_the_earliest_deadline_and_each_later_one() -> None:
    d = Deadlines()
    async with running(d) as timer:
        start = time.monotonic()
        d.pending = {start + 0.05, start + 0.02}
        timer.moved()
        assert timer.armed_for == start + 0.02
        await asyncio.sleep(0.2)
        assert len(d.fired) == 2
        assert d.fired[0] >= start + 0.02
        assert d.fired[1] >= start + 0.05
        assert timer.armed_for is None  # nothing left in flight: nothing armed


async def test_an_earlier_deadline_rearms_and_a_removed_one_disarms() -> None:
    d = Deadlines()
    async with running(d) as timer:
        now = time.monotonic()
        d.pending = {now + 3600}
        timer.moved()
        d.pending.add(now + 0.02)  # earlier than what the handle is armed for
        timer.moved()
        assert timer.armed_for == now + 0.02
        await asyncio.sleep(0.1)
        assert len(d.fired) == 1
        assert timer.armed_for == now + 3600
        d.pending.clear()  # the last wave ended in time
        timer.moved()
        assert timer.armed_for is None


async def test_a_deadline_that_went_away_never_fires() -> None:
    d = Deadlines()
    async with running(d) as timer:
        d.pending = {time.monotonic() + 0.02}
        timer.moved()
        d.pending.clear()
        timer.moved()
        await asyncio.sleep(0.1)
        assert d.fired == []


async def test_stopping_disarms_and_moved_then_does_nothing() -> None:
    d = Deadlines()
    async with running(d) as timer:
        d.pending = {time.monotonic() + 0.02}
        timer.moved()
    assert timer.armed_for is None
    timer.moved()
    assert timer.armed_for is None
    await asyncio.sleep(0.1)
    assert d.fired == []
