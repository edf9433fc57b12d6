"""One run's measurements (any runner), and what every runner shares to compute them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from treewave.core.messages import Task
from treewave.core.policy import Load, imbalance

__all__ = ["TASK_BYTES", "RunResult", "imbalance_of", "time_mean"]

TASK_BYTES = 2 * len(Task(id="t-0123456789ab", duration_s=0.123).model_dump_json())
"""Bytes one moved task costs on the wire: it travels in the donor's `transfer.prepared`
and in the recipient's `transfer.deliver` (an estimate: a typical task as JSON, twice)."""


@dataclass
class RunResult:
    """One policy on one workload seed. Times in seconds from the first arrival."""

    policy: str
    seed: int
    runner: str
    tasks: int
    lower_bound_s: float
    makespan_s: float
    tasks_moved: int
    mean_wait_s: float
    imbalance_mean: float
    """Time-averaged imbalance (max pressure minus cluster pressure, s of work per cpu)."""
    rounds: int = 0
    imbalance: list[tuple[float, float]] = field(default_factory=list)
    """(time, imbalance) samples."""
    busy: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """Per server, (time, tasks running) at every change."""
    cpus: dict[str, int] = field(default_factory=dict)
    wave_latency_buckets: list[tuple[float, int]] = field(default_factory=list)
    """Real runners: Echo/Finn wave durations during the run, (upper bound s, count)."""
    wave_latency_mean_s: float | None = None
    reported_policy: str | None = None
    """Real runners: the policy the balancer said it ran (`/api/status`)."""
    completed: int | None = None
    """Real runners: the tasks the servers reported completed during the run."""
    compose_project: str | None = None
    """The `compose` runner: the Compose project the run was (taken down after it)."""

    @property
    def ratio(self) -> float:
        return self.makespan_s / self.lower_bound_s if self.lower_bound_s > 0 else 1.0

    @property
    def bytes_moved(self) -> int:
        return self.tasks_moved * TASK_BYTES

    def summary(self) -> dict[str, Any]:
        """The scalar columns (the CSV row)."""
        return {
            "policy": self.policy,
            "seed": self.seed,
            "runner": self.runner,
            "tasks": self.tasks,
            "lower_bound_s": round(self.lower_bound_s, 6),
            "makespan_s": round(self.makespan_s, 6),
            "ratio": round(self.ratio, 6),
            "tasks_moved": self.tasks_moved,
            "bytes_moved": self.bytes_moved,
            "mean_wait_s": round(self.mean_wait_s, 6),
            "imbalance_mean": round(self.imbalance_mean, 6),
            "rounds": self.rounds,
            "wave_latency_mean_s": self.wave_latency_mean_s,
            "reported_policy": self.reported_policy,
            "completed": self.completed,
        }

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), **self.summary()}


def imbalance_of(work_s: Sequence[float], cpus: Sequence[int]) -> float:
    """`core.policy.imbalance` of servers known only by their expected work and cpus."""
    return imbalance(
        Load(str(i), c, (), (w,)) for i, (w, c) in enumerate(zip(work_s, cpus, strict=True))
    )


def time_mean(samples: Sequence[tuple[float, float]], end: float) -> float:
    """The time average of a step function given as (time, value) samples, up to `end`."""
    if not samples or end <= samples[0][0]:
        return samples[0][1] if samples else 0.0
    total = 0.0
    for (t0, v), (t1, _) in zip(samples, [*samples[1:], (end, 0.0)], strict=True):
        total += v * max(0.0, min(t1, end) - t0)
    return total / (end - samples[0][0])
