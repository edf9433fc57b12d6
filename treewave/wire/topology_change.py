"""Driving a deployment change through the balancer: hand it the topology (retrying while
it starts or restarts), then follow the servers leaving the topology until the balancer
reports each one retired (drained, holding nothing), with a progress report. One driver
for `treewave run`'s SIGHUP reload and for `treewave apply` under Compose; what happens to
a retired server (its process stopped, its container removed) is the caller's."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from treewave.wire.topology_api import (
    TopologyApiError,
    TopologyRejected,
    TopologyState,
    get_topology,
    post_topology,
)

__all__ = [
    "BAR_WIDTH",
    "DrainFollower",
    "DrainStep",
    "DrainTimeout",
    "ProgressBars",
    "drain_line",
    "post_retrying",
]

BAR_WIDTH = 30


def post_retrying(
    balancer: str,
    document: dict[str, Any],
    *,
    token: str = "",
    within_s: float,
    every_s: float = 0.5,
    stop: Callable[[], bool] = lambda: False,
) -> Any:
    """Make `document` the balancer's desired topology; retried every `every_s` while the
    balancer cannot be reached (it may be starting) for up to `within_s`. A refusal
    (`TopologyRejected`), a balancer without the topology API, the time running out or
    `stop()` is final: the last `TopologyApiError` is raised."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return post_topology(balancer, document, token=token)
        except TopologyRejected:
            raise
        except TopologyApiError as exc:
            if exc.missing or time.monotonic() > deadline or stop():
                raise
        time.sleep(every_s)


class DrainTimeout(TopologyApiError):
    """Some servers were still draining when the time ran out (`pending` names them)."""

    def __init__(self, timeout: float, pending: list[str]) -> None:
        super().__init__(f"still draining after {timeout:g} s: {', '.join(pending)}")
        self.pending = pending


@dataclass(frozen=True)
class DrainStep:
    """What one look at `GET /api/topology` found."""

    state: TopologyState
    retired: tuple[str, ...]
    """Followed servers reported retired since the previous look (each reported once)."""
    progressed: tuple[str, ...]
    """Followed servers still draining whose held task counts changed since the last look."""

    def held(self, name: str) -> tuple[Any, Any]:
        """(queued, running) of a retiring server, as it last reported them."""
        return _held(self.state, name)


def _held(state: TopologyState, name: str) -> tuple[Any, Any]:
    info = state.retiring.get(name, {})
    return info.get("queued"), info.get("running")


@dataclass
class DrainFollower:
    """Follows servers leaving the topology until the balancer reports each one retired."""

    balancer: str
    token: str = ""
    names: list[str] = field(default_factory=list)
    """The servers still followed, in the order they were added."""
    _held: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False)

    def follow(self, names: Iterable[str]) -> None:
        self.names += [n for n in names if n not in self.names]

    def forget(self, names: Iterable[str]) -> None:
        """Stop following these (e.g. back in the topology)."""
        gone = set(names)
        self.names = [n for n in self.names if n not in gone]

    def poll(self) -> DrainStep:
        """One look; a `TopologyApiError` when the balancer cannot be asked (its `missing`
        says whether asking again could help)."""
        state = get_topology(self.balancer, token=self.token)
        retired = tuple(n for n in self.names if state.is_retired(n))
        self.forget(retired)
        progressed = []
        for name in self.names:
            if name in state.retiring and self._held.get(name) != _held(state, name):
                self._held[name] = _held(state, name)
                progressed.append(name)
        return DrainStep(state, retired, tuple(progressed))

    def wait(
        self,
        timeout: float,
        every_s: float = 1.0,
        show: Callable[[TopologyState], None] = lambda state: None,
    ) -> TopologyState:
        """Look every `every_s` until every followed server is retired (the last state),
        calling `show` after each look; `DrainTimeout` after `timeout` seconds. A balancer
        that cannot be reached is asked again until then."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                step = self.poll()
            except TopologyApiError as exc:
                if exc.missing or time.monotonic() > deadline:
                    raise
                time.sleep(every_s)
                continue
            show(step.state)
            if not self.names:
                return step.state
            if time.monotonic() > deadline:
                raise DrainTimeout(timeout, list(self.names))
            time.sleep(every_s)


def drain_line(name: str, state: TopologyState, start: dict[str, int]) -> str:
    """`name [#####-----] left/at-start` for one retiring server (`start` remembers what
    each held at its first report)."""
    if state.is_retired(name):
        return f"{name:<16} [{'#' * BAR_WIDTH}] retired"
    info = state.retiring.get(name, {})
    left = int(info.get("queued") or 0) + int(info.get("running") or 0)
    if not info.get("reported"):
        return f"{name:<16} [{'.' * BAR_WIDTH}] waiting for its report"
    first = start.setdefault(name, max(left, 1))
    done = max(0, first - left)
    filled = round(BAR_WIDTH * done / first)
    return f"{name:<16} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {left} left of {first}"


@dataclass
class ProgressBars:
    """One bar per server, redrawn in place on a terminal (printed again otherwise)."""

    names: list[str]
    out: TextIO
    _start: dict[str, int] = field(default_factory=dict)
    _shown: int = 0

    def show(self, state: TopologyState) -> None:
        tty = self.out.isatty()
        if tty and self._shown:
            self.out.write(f"\x1b[{self._shown}F")
        for name in self.names:
            self.out.write(("\x1b[K" if tty else "") + drain_line(name, state, self._start) + "\n")
        self._shown = len(self.names)
        self.out.flush()
