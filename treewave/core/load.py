"""What a server's load is, in one place: expected work and pressure.

A task's expected duration is its declared `duration_s` (the balancer fills in the
topology's `task_time_s` when a submission declares none); a running task counts for what
is left of it. **Pressure is expected work per CPU, in seconds**: how long the server
would need to empty itself if its work spread perfectly over its slots. Node metrics,
balancer metrics, the API (and so the status page) and `treewave status` all use
`pressure` below; nothing else computes it.

Servers report their queued durations as a histogram (`duration_histogram`) so an Echo
reply stays small whatever the queue length.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from treewave.core.messages import ServerState

__all__ = [
    "HISTOGRAM_BUCKETS",
    "counts_histogram",
    "duration_histogram",
    "expected_work_s",
    "load_level",
    "pressure",
    "pressure_of",
    "queued_durations",
    "running_left",
]

HISTOGRAM_BUCKETS = 64
"""Most distinct durations a server reports; more are merged (see `duration_histogram`)."""


def duration_histogram(
    durations: Iterable[float], max_buckets: int = HISTOGRAM_BUCKETS
) -> tuple[tuple[float, int], ...]:
    """(duration, count) pairs, longest first. Exact while there are at most `max_buckets`
    distinct durations; otherwise rounded to 3 significant digits, and if that is still
    too many, neighbouring buckets merge pairwise into their count-weighted mean, which
    keeps the total work (up to that rounding, at most 0.5 %)."""
    return counts_histogram(Counter(durations), max_buckets)


def counts_histogram(
    counts: Mapping[float, int], max_buckets: int = HISTOGRAM_BUCKETS
) -> tuple[tuple[float, int], ...]:
    """`duration_histogram` from counts by duration (a ledger's `queued_durations`)."""
    if len(counts) > max_buckets:
        rounded: Counter[float] = Counter()
        for d, c in counts.items():
            rounded[float(f"{d:.3g}")] += c
        counts = rounded
    items = sorted(((d, c) for d, c in counts.items() if c > 0), reverse=True)
    while len(items) > max_buckets:
        merged: list[tuple[float, int]] = []
        for i in range(0, len(items), 2):
            chunk = items[i : i + 2]
            n = sum(c for _, c in chunk)
            merged.append((sum(d * c for d, c in chunk) / n, n))
        items = merged
    return tuple(items)


def running_left(state: ServerState, task_time_s: float) -> list[float]:
    """Seconds left of each running task (a server that does not report them: each
    running task counts for a whole `task_time_s`)."""
    if len(state.running_left_s) == state.running:
        return list(state.running_left_s)
    return [task_time_s] * state.running


def queued_durations(state: ServerState, task_time_s: float) -> list[float]:
    """Every queued task's expected duration, longest first (a server that does not
    report its histogram: `task_time_s` each)."""
    if sum(c for _, c in state.queued_s) == state.queued:
        return [d for d, c in sorted(state.queued_s, reverse=True) for _ in range(c)]
    return [task_time_s] * state.queued


def expected_work_s(state: ServerState, task_time_s: float) -> float:
    """Seconds of work on the server: what is left of its running tasks plus its queue."""
    if len(state.running_left_s) == state.running:
        running = sum(state.running_left_s)
    else:
        running = task_time_s * state.running
    if sum(c for _, c in state.queued_s) == state.queued:
        queued = sum(d * c for d, c in state.queued_s)
    else:
        queued = task_time_s * state.queued
    return running + queued


def pressure_of(work_s: float, cpus: int) -> float:
    """Expected work per CPU, in seconds: THE definition of pressure."""
    return work_s / cpus


def pressure(state: ServerState, task_time_s: float) -> float:
    """A reported server's pressure (`pressure_of` its expected work)."""
    return pressure_of(expected_work_s(state, task_time_s), state.cpus)


def load_level(running: int, queued: int, cpus: int, overload_percent: float) -> int:
    """The colour band of a server (what the status page and `treewave status` paint):
    0 idle, 1-4 increasingly busy, 5 overloaded, by tasks per CPU against the topology's
    `overload_percent` (the lab's `max_cpu`). The API reports it as `level`; nothing else
    computes it."""
    load = running + queued
    if load <= 0:
        return 0
    ratio = load / max(cpus, 1) / (overload_percent / 100)
    if ratio >= 1:
        return 5
    return min(4, 1 + int(ratio * 4))
