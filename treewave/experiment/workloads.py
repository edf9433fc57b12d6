"""Seeded workloads: who gets which tasks, and when (the benchmark's eight, and the
general ones `treewave experiment` specs describe, `generate`).

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

__all__ = [
    "ARRIVALS",
    "DURATIONS",
    "EXTRA_KINDS",
    "KINDS",
    "PLACEMENTS",
    "SHAPES",
    "Batch",
    "Shape",
    "Workload",
    "all_workloads",
    "benchmark",
    "benchmark_names",
    "generate",
    "make",
]

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


ARRIVALS = ("initial", "bursts", "stream")
PLACEMENTS = ("hot", "zipf", "even")
SHAPES = ("fixed", "varied", "heavy-tailed", "bimodal")
MAX_TASK_S = 3600.0


@dataclass(frozen=True, slots=True)
class Shape:
    """How a general workload is drawn (see `generate`); the fields of a spec's
    `[workload]` table."""

    arrivals: str = "initial"
    placement: str = "hot"
    hot: int = 2
    zipf_s: float = 1.2
    tasks: int | None = None
    target_s: float = 4.0
    durations: str = "fixed"
    duration_s: float = FIXED_S
    varied_s: tuple[float, float] = VARIED_S
    heavy_min_s: float = 0.1
    heavy_alpha: float = 1.5
    heavy_max_s: float = 10.0
    short_s: float = 0.2
    long_s: float = 2.0
    long_share: float = 0.1
    wrong_factor: tuple[float, float] | None = None
    bursts: int = 3
    burst_gap_s: float = 1.0
    stream_s: float = 6.0
    stream_gap_s: float = 0.5

    def mean_s(self) -> float:
        if self.durations == "fixed":
            return self.duration_s
        if self.durations == "varied":
            lo, hi = self.varied_s
            return (hi - lo) / math.log(hi / lo) if hi > lo else lo
        if self.durations == "bimodal":
            return self.long_share * self.long_s + (1 - self.long_share) * self.short_s
        a = self.heavy_alpha  # Pareto mean, ignoring the cap
        return self.heavy_min_s * a / (a - 1) if a > 1 else self.heavy_max_s / 2

    def draw(self, rng: random.Random) -> float:
        if self.durations == "fixed":
            return self.duration_s
        if self.durations == "varied":
            lo, hi = self.varied_s
            d = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        elif self.durations == "bimodal":
            d = self.long_s if rng.random() < self.long_share else self.short_s
        else:
            d = min(self.heavy_max_s, self.heavy_min_s * rng.paretovariate(self.heavy_alpha))
        # rounded to 10 ms so tasks group into few batches
        return min(MAX_TASK_S, max(0.01, round(d, 2)))


def generate(shape: Shape, servers: Mapping[str, int], seed: int = 0) -> Workload:
    """A workload drawn from `shape` on `servers` (name -> cpus): `tasks` tasks (or about
    `target_s` of work per cpu), arriving all at once (`initial`), in `bursts` spaced
    `burst_gap_s` apart, or as a `stream` (one arrival every `stream_gap_s` for
    `stream_s`); each arrival lands on the `hot` servers, on servers drawn Zipf-like, or
    `even`ly; with `wrong_factor`, each task really runs its declared duration times a
    factor drawn uniformly in that range."""
    if not servers:
        raise ValueError("need at least one server")
    rng = random.Random(f"generate/{seed}")
    names = sorted(servers)
    n = shape.tasks or max(1, round(shape.target_s * sum(servers.values()) / shape.mean_s()))
    ds = [shape.draw(rng) for _ in range(n)]
    ranked = rng.sample(names, len(names))
    hot = ranked[: max(1, min(shape.hot, len(names)))]
    weights = [1 / (k + 1) ** shape.zipf_s for k in range(len(ranked))]
    if shape.arrivals == "initial":
        times = [0.0]
    elif shape.arrivals == "bursts":
        times = [round(i * shape.burst_gap_s, 3) for i in range(max(1, shape.bursts))]
    else:
        count = max(1, round(shape.stream_s / shape.stream_gap_s))
        times = [round(i * shape.stream_gap_s, 3) for i in range(count)]
    out: list[Batch] = []
    for i, at in enumerate(times):
        part = ds[i :: len(times)]
        if shape.placement == "hot":
            targets = hot if shape.arrivals == "initial" else [hot[i % len(hot)]]
        elif shape.placement == "zipf":
            targets = [rng.choices(ranked, weights)[0] for _ in range(len(part))]
        else:
            targets = names
        per: dict[str, list[float]] = {}
        for j, d in enumerate(part):
            per.setdefault(targets[j % len(targets)], []).append(d)
        for node, mine in sorted(per.items()):
            if shape.wrong_factor is None:
                out += _batches(rng, at, node, mine)
            else:
                lo, hi = shape.wrong_factor
                for d in mine:
                    actual = min(MAX_TASK_S, max(0.001, round(d * rng.uniform(lo, hi), 3)))
                    out.append(Batch(at, node, 1, d, actual))
    out = [b for b in out if b.count > 0]
    return Workload(f"{shape.arrivals}-{shape.placement}-{shape.durations}", seed, tuple(out))


def benchmark_names() -> list[str]:
    """The eight benchmark workloads' names (`all_workloads`)."""
    return [f"{k}-{d}" for k in KINDS for d in DURATIONS] + [f"{k}-varied" for k in EXTRA_KINDS]


def benchmark(name: str, servers: Mapping[str, int], seed: int, target_s: float = 4.0) -> Workload:
    """One of the eight benchmark workloads by name (e.g. `skewed-fixed`)."""
    kind, _, durations = name.partition("-")
    return make(kind, durations, servers, seed, target_s)


def all_workloads(
    servers: Mapping[str, int], seed: int = 0, target_s: float = 4.0
) -> list[Workload]:
    return [make(k, d, servers, seed, target_s) for k in KINDS for d in DURATIONS] + [
        make(k, "varied", servers, seed, target_s) for k in EXTRA_KINDS
    ]
