"""Seeded workloads for the balancing benchmark: who gets which tasks, and when.

A workload is a list of `Batch`es (at `at_s` seconds after the start, `count` tasks of
`duration_s` seconds each land on server `node`) over a given set of servers (name ->
cpus). Everything is drawn from `random.Random(seed)`, so a name, a seed and the servers
give the same batches every time (see tests/unit/test_workloads.py). Pure: no I/O.

Kinds (each with `fixed` or `varied` task durations):

- `skewed`: all the work lands on a few servers (`hot`, default 2) at once.
- `zipf`: every server gets work, server of rank k a share proportional to 1/k^s.
- `bursts`: a few bursts spaced in time, each on one random server.
- `wrong` (varied only): `skewed`, but every task really runs its declared duration times
  a factor drawn uniformly in [0.5, 1.5] (`Batch.actual_s`): the balancer plans with
  declarations that are wrong by up to +-50 % and learns nothing until tasks finish.
- `stream` (varied only): a batch every `stream_gap_s` over 1.5 x `target_s` seconds, each
  on a server drawn Zipf-like (a few servers get most arrivals); about 2/3 of capacity.

Sizes are chosen from the total cpus so that the lower bound (`lower_bound`) is about
`target_s` seconds: runs stay short (a few seconds each).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KINDS = ("skewed", "zipf", "bursts")
DURATIONS = ("fixed", "varied")
EXTRA_KINDS = ("wrong", "stream")
"""Kinds that come with varied durations only."""
WRONG_FACTOR = (0.5, 1.5)
FIXED_S = 0.5
VARIED_S = (0.1, 1.5)
"""Varied durations: drawn log-uniformly in this range (many short, some long)."""


@dataclass(frozen=True, slots=True)
class Batch:
    at_s: float
    node: str
    count: int
    duration_s: float
    """The declared duration (what the balancer plans with)."""
    actual_s: float | None = None
    """How long each task really runs, when that differs from the declaration."""

    @property
    def run_s(self) -> float:
        return self.duration_s if self.actual_s is None else self.actual_s


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    seed: int
    batches: tuple[Batch, ...]

    @property
    def tasks(self) -> int:
        return sum(b.count for b in self.batches)

    @property
    def work_s(self) -> float:
        """Work really done (actual durations)."""
        return sum(b.count * b.run_s for b in self.batches)

    def arrivals(self) -> list[tuple[float, tuple[Batch, ...]]]:
        """The batches grouped by arrival time, earliest first, each group in batch order
        (the order they are submitted in)."""
        times = sorted({b.at_s for b in self.batches})
        return [(at, tuple(b for b in self.batches if b.at_s == at)) for at in times]

    @property
    def longest_s(self) -> float:
        return max((b.run_s for b in self.batches), default=0.0)

    def lower_bound(self, total_cpus: int) -> float:
        """No schedule on `total_cpus` slots, counting from the first arrival, can finish
        earlier: for every arrival time a, a + (work arriving at or after a) / cpus, and
        a + d for every task. With all work at time 0 this is the classic
        max(total work / total cpus, longest task)."""
        if not self.batches:
            return 0.0
        start = min(b.at_s for b in self.batches)
        bound = max(b.at_s - start + b.run_s for b in self.batches)
        for a in sorted({b.at_s for b in self.batches}):
            later = sum(b.count * b.run_s for b in self.batches if b.at_s >= a)
            bound = max(bound, a - start + later / total_cpus)
        return bound

    def classic_bound(self, total_cpus: int) -> float:
        """max(total work / total cpus, longest task), ignoring arrival times."""
        return max(self.work_s / total_cpus, self.longest_s)


def _durations(rng: random.Random, kind: str, n: int) -> list[float]:
    if kind == "fixed":
        return [FIXED_S] * n
    lo, hi = VARIED_S
    # rounded to 100 ms so tasks group into few batches (few HTTP calls per workload)
    return [round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 1) or lo for _ in range(n)]


def _batches(rng: random.Random, at_s: float, node: str, durations: Sequence[float]) -> list[Batch]:
    """Group equal durations into one batch (one POST /api/tasks), in random order (not
    longest first, which would hand every scheduler an LPT order for free)."""
    counts: dict[float, int] = {}
    for d in durations:
        counts[d] = counts.get(d, 0) + 1
    out = [Batch(at_s, node, c, d) for d, c in sorted(counts.items())]
    rng.shuffle(out)
    return out


def _task_count(total_cpus: int, durations: str, target_s: float) -> int:
    lo, hi = VARIED_S
    mean = FIXED_S if durations == "fixed" else (hi - lo) / math.log(hi / lo)
    return max(1, round(target_s * total_cpus / mean))


def make(
    kind: str,
    durations: str,
    servers: Mapping[str, int],
    seed: int = 0,
    target_s: float = 4.0,
    hot: int = 2,
    zipf_s: float = 1.2,
    bursts: int = 3,
    burst_gap_s: float = 1.0,
    stream_gap_s: float = 0.5,
) -> Workload:
    """The workload `kind`/`durations` on `servers` (name -> cpus), about `target_s` of work
    per cpu in all."""
    if kind not in KINDS + EXTRA_KINDS:
        raise ValueError(f"kind must be one of {KINDS + EXTRA_KINDS}, not {kind!r}")
    if durations not in DURATIONS or (kind in EXTRA_KINDS and durations != "varied"):
        allowed = ("varied",) if kind in EXTRA_KINDS else DURATIONS
        raise ValueError(f"durations must be one of {allowed}, not {durations!r}")
    if not servers:
        raise ValueError("need at least one server")
    rng = random.Random(f"{kind}/{durations}/{seed}")
    names = sorted(servers)
    total_cpus = sum(servers.values())
    n = _task_count(total_cpus, durations, target_s)
    ds = _durations(rng, durations, n)
    out: list[Batch] = []
    if kind == "skewed":
        targets = rng.sample(names, min(hot, len(names)))
        for i, t in enumerate(targets):
            out += _batches(rng, 0.0, t, ds[i :: len(targets)])
    elif kind == "wrong":
        targets = rng.sample(names, min(hot, len(names)))
        for i, d in enumerate(ds):
            actual = round(d * rng.uniform(*WRONG_FACTOR), 3)
            out.append(Batch(0.0, targets[i % len(targets)], 1, d, actual))
    elif kind == "stream":
        ranked = rng.sample(names, len(names))
        weights = [1 / (k + 1) ** zipf_s for k in range(len(ranked))]
        arrivals = max(1, round(1.5 * target_s / stream_gap_s))
        for i in range(arrivals):
            node = rng.choices(ranked, weights)[0]
            out += _batches(rng, round(i * stream_gap_s, 3), node, ds[i::arrivals])
    elif kind == "zipf":
        ranked = rng.sample(names, len(names))
        weights = [1 / (k + 1) ** zipf_s for k in range(len(ranked))]
        shares: dict[str, list[float]] = {name: [] for name in ranked}
        for d in ds:
            shares[rng.choices(ranked, weights)[0]].append(d)
        for name in ranked:
            out += _batches(rng, 0.0, name, shares[name])
    else:  # bursts
        per = [ds[i::bursts] for i in range(bursts)]
        for i, part in enumerate(per):
            out += _batches(rng, round(i * burst_gap_s, 3), rng.choice(names), part)
    out = [b for b in out if b.count > 0]
    return Workload(f"{kind}-{durations}", seed, tuple(sorted(out, key=lambda b: b.at_s)))  # stable


def all_workloads(
    servers: Mapping[str, int], seed: int = 0, target_s: float = 4.0
) -> list[Workload]:
    return [make(k, d, servers, seed, target_s) for k in KINDS for d in DURATIONS] + [
        make(k, "varied", servers, seed, target_s) for k in EXTRA_KINDS
    ]
