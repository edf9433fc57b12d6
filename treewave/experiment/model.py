"""The `model` runner: a discrete-event model of a cluster running a policy's own code.

Idealised: no CPU contention, no network. Each server runs its queue on its CPU slots in
the topology's `queue_order`; the balancer plans a round when work is submitted and every
`rebalance_interval_s` (never when that is 0, as the balancer); a round sees an
instantaneous snapshot (running tasks' declared time left, queued declared durations, in
run order) and its moves land `round_s` seconds
later, as the donor then has them (a task that started meanwhile stays): by duration, the
queued task of closest declared duration (the last in run order among equals), or by
count, the last ones in run order (as `TaskLedger.prepare` does). Tasks run their
*actual* duration. Deterministic: the same inputs give the same result.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from treewave.core.policies import Policy
from treewave.core.policy import Load, Move, imbalance
from treewave.core.topology import Settings
from treewave.experiment.results import RunResult, time_mean
from treewave.experiment.workloads import Workload

__all__ = ["DEFAULT_ROUND_S", "SAMPLE_S", "simulate"]

DEFAULT_ROUND_S = 0.02
"""Snapshot-to-moves latency of a round (one Echo wave and a transfer on loopback)."""
SAMPLE_S = 0.05
"""How often the imbalance is sampled."""
MAX_EVENTS = 10_000_000


@dataclass(order=True)
class _Job:
    key: tuple[float, int]
    declared: float = field(compare=False)
    actual: float = field(compare=False)
    arrived: float = field(compare=False)


@dataclass
class _Server:
    name: str
    cpus: int
    longest_first: bool
    queue: list[_Job] = field(default_factory=list)
    running: dict[int, tuple[float, _Job]] = field(default_factory=dict)
    """finish event id -> (start time, job)"""
    busy: list[tuple[float, int]] = field(default_factory=list)

    def enqueue(self, job: _Job) -> None:
        if self.longest_first:
            job.key = (-job.declared, job.key[1])
            bisect.insort(self.queue, job)
        else:
            self.queue.append(job)

    def load(self, now: float) -> Load:
        return Load(
            self.name,
            self.cpus,
            tuple(max(0.0, j.declared - (now - st)) for st, j in self.running.values()),
            tuple(j.declared for j in self.queue),
        )

    def take(self, move: Move) -> list[_Job]:
        if move.durations is None:
            n = min(move.count, len(self.queue))
            taken = self.queue[len(self.queue) - n :]
            del self.queue[len(self.queue) - n :]
            return taken
        taken = []
        for d in move.durations:
            if not self.queue:
                break
            best = min(range(len(self.queue)), key=lambda i: (abs(self.queue[i].declared - d), -i))
            taken.append(self.queue.pop(best))
        return taken


def simulate(
    servers: dict[str, int],
    workload: Workload,
    policy: Policy,
    settings: Settings,
    round_s: float = DEFAULT_ROUND_S,
    seed: int = 0,
) -> RunResult:
    """Run `workload` on `servers` (name -> cpus) with `policy` planning every round."""
    longest_first = settings.queue_order == "longest-first"
    state = {n: _Server(n, c, longest_first) for n, c in servers.items()}
    seq = itertools.count()
    events: list[tuple[float, int, str, Any]] = []
    for at, batches in workload.arrivals():
        heapq.heappush(events, (at, next(seq), "arrive", batches))
    interval = settings.rebalance_interval_s
    if interval > 0:
        heapq.heappush(events, (interval, next(seq), "tick", None))
    heapq.heappush(events, (0.0, next(seq), "sample", None))
    start = min((b.at_s for b in workload.batches), default=0.0)
    remaining = workload.tasks
    moved = rounds = 0
    waits: list[float] = []
    samples: list[tuple[float, float]] = []
    last_end = start

    def start_slots(s: _Server, t: float) -> None:
        while len(s.running) < s.cpus and s.queue:
            job = s.queue.pop(0)
            waits.append(t - job.arrived)
            eid = next(seq)
            s.running[eid] = (t, job)
            heapq.heappush(events, (t + job.actual, eid, "finish", s.name))
        note_busy(s, t)

    def note_busy(s: _Server, t: float) -> None:
        if not s.busy or s.busy[-1][1] != len(s.running):
            if s.busy and s.busy[-1][0] == t - start:
                s.busy.pop()
            s.busy.append((t - start, len(s.running)))

    for _ in range(MAX_EVENTS):
        if not events or remaining <= 0:
            break
        now, eid, kind, data = heapq.heappop(events)
        if kind == "finish":
            s = state[data]
            s.running.pop(eid)
            remaining -= 1
            last_end = now
            start_slots(s, now)
        elif kind == "arrive":
            for b in data:
                s = state[b.node]
                for _ in range(b.count):
                    s.enqueue(_Job((0.0, next(seq)), b.duration_s, b.run_s, now))
                start_slots(s, now)
            if interval > 0:  # the balancer's loop wakes on submissions (none when off)
                heapq.heappush(events, (now + 1e-9, next(seq), "round", None))
        elif kind == "sample":
            samples.append((now - start, imbalance(s.load(now) for s in state.values())))
            heapq.heappush(events, (now + SAMPLE_S, next(seq), "sample", None))
        elif kind in ("tick", "round"):
            if kind == "tick":
                heapq.heappush(events, (now + interval, next(seq), "tick", None))
            rounds += 1
            moves = policy.plan([s.load(now) for s in state.values()], settings)
            if moves:
                heapq.heappush(events, (now + round_s, next(seq), "apply", moves))
        elif kind == "apply":
            for m in data:
                taken = state[m.source].take(m)
                dst = state[m.target]
                for job in taken:
                    dst.enqueue(job)
                moved += len(taken)
                start_slots(dst, now)
    else:
        raise RuntimeError(f"the model did not finish within {MAX_EVENTS} events")
    makespan = last_end - start
    for s in state.values():
        note_busy(s, last_end)
    return RunResult(
        policy=policy.name,
        seed=seed,
        runner="model",
        tasks=workload.tasks,
        lower_bound_s=workload.lower_bound(sum(servers.values())),
        makespan_s=makespan,
        tasks_moved=moved,
        mean_wait_s=sum(waits) / len(waits) if waits else 0.0,
        imbalance_mean=time_mean(samples, makespan),
        rounds=rounds,
        imbalance=samples,
        busy={n: s.busy for n, s in state.items()},
        cpus=dict(servers),
    )
