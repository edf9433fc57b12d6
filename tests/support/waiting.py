"""Waiting for a condition by polling, never by sleeping a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["HEALING", "wait_for", "wait_for_value", "wait_until"]

T = TypeVar("T")


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.2,
    on_poll: Callable[[], None] | None = None,
    retry_on: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError),
) -> T:
    """Poll `probe` until it returns a true value and return that; an exception in
    `retry_on` counts as "not yet". Fails naming `what` (and the last exception or value)
    after `timeout` seconds. The probe may answer None for "not yet": the value returned
    is never None (it is true), which the type says."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
        except retry_on as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if on_poll is not None:
            on_poll()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


HEALING: tuple[type[BaseException], ...] = (AssertionError, OSError, ValueError)
"""What a deployment's probe raises while it heals: a probe's own assertion, a refused or
failed connection (`urllib.error.URLError` is an OSError), an answer that is not JSON yet."""


def wait_for_value(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    every: float = 1.0,
    retry_on: tuple[type[BaseException], ...] = HEALING,
) -> T:
    """`wait_for` with a probe that answers None for "not yet" (and a value once there),
    polled every `every` seconds; `retry_on` failures count as "not yet" and the last one
    is named on timeout."""
    value = wait_for(what, probe, timeout, interval=every, retry_on=retry_on)
    assert value is not None
    return value


async def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    """The same on an event loop, for in-process apps: poll `condition` every 10 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {limit_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)
