"""The balancing policy: a pure function from an Echo snapshot to moves of queued tasks.

Greedy on pressure ((running + queued) / cpus): repeatedly take one queued task from the
most pressed server that has one and give it to the server whose pressure after taking
it is lowest, as long as that stays strictly below the donor's pressure. Each step
lowers the donor without raising anyone to its level, so the maximum pressure never rises;
it stops when no single move helps. Running tasks are never moved and no server gives
more than it has queued.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from treewave.core.messages import ServerState


@dataclass(frozen=True, slots=True)
class Move:
    source: str
    target: str
    tasks: int


@dataclass(frozen=True, slots=True)
class Load:
    """What the policy needs of a server."""

    name: str
    cpus: int
    running: int
    queued: int

    @property
    def pressure(self) -> float:
        return (self.running + self.queued) / self.cpus


def loads_of(states: Iterable[ServerState]) -> list[Load]:
    return [Load(s.name, s.cpus, s.running, s.queued) for s in states]


def max_pressure(loads: Iterable[Load]) -> float:
    return max((x.pressure for x in loads), default=0.0)


def imbalance(loads: Iterable[Load]) -> float:
    """Maximum pressure minus the cluster-wide pressure (0 when perfectly even)."""
    loads = list(loads)
    if not loads:
        return 0.0
    total = sum(x.running + x.queued for x in loads) / sum(x.cpus for x in loads)
    return max_pressure(loads) - total


def plan_moves(loads: Iterable[Load], max_moves: int = 100_000) -> list[Move]:
    """Moves (source, target, tasks) that even out pressure; see the module docstring."""
    servers = {x.name: x for x in loads}
    if len(servers) < 2:
        return []
    total = {n: x.running + x.queued for n, x in servers.items()}
    queued = {n: x.queued for n, x in servers.items()}
    cpus = {n: x.cpus for n, x in servers.items()}
    # Donors: max-heap by pressure (only servers with queued tasks).
    donors = [(-total[n] / cpus[n], n) for n in servers if queued[n] > 0]
    # Recipients: min-heap by pressure after receiving one more task.
    takers = [((total[n] + 1) / cpus[n], n) for n in servers]
    heapq.heapify(donors)
    heapq.heapify(takers)
    moved: Counter[tuple[str, str]] = Counter()
    steps = 0
    while donors and steps < max_moves:
        neg_p, src = donors[0]
        if -neg_p != total[src] / cpus[src] or queued[src] == 0:
            heapq.heappop(donors)  # stale entry
            if queued[src] > 0:
                heapq.heappush(donors, (-total[src] / cpus[src], src))
            continue
        dst = _best_taker(takers, total, cpus, exclude=src)
        if dst is None or (total[dst] + 1) / cpus[dst] >= total[src] / cpus[src]:
            break
        total[src] -= 1
        queued[src] -= 1
        total[dst] += 1
        moved[(src, dst)] += 1
        steps += 1
        heapq.heapreplace(donors, (-total[src] / cpus[src], src))
        heapq.heappush(takers, ((total[dst] + 1) / cpus[dst], dst))
        heapq.heappush(takers, ((total[src] + 1) / cpus[src], src))
    return [Move(s, t, k) for (s, t), k in sorted(moved.items()) if k > 0]


def _best_taker(
    takers: list[tuple[float, str]], total: dict[str, int], cpus: dict[str, int], exclude: str
) -> str | None:
    """Pop stale entries until the heap top is current; skip (and keep) the donor."""
    skipped: list[tuple[float, str]] = []
    found: str | None = None
    while takers:
        p, n = takers[0]
        if p != (total[n] + 1) / cpus[n]:
            heapq.heappop(takers)
            continue
        if n == exclude:
            skipped.append(heapq.heappop(takers))
            continue
        found = n
        break
    for item in skipped:
        heapq.heappush(takers, item)
    return found


def apply_moves(loads: Iterable[Load], moves: Iterable[Move]) -> list[Load]:
    """The loads after the moves (for reporting and tests)."""
    by = {x.name: x for x in loads}
    for m in moves:
        s, t = by[m.source], by[m.target]
        by[m.source] = Load(s.name, s.cpus, s.running, s.queued - m.tasks)
        by[m.target] = Load(t.name, t.cpus, t.running, t.queued + m.tasks)
    return list(by.values())


def plan_drain(
    sources: Mapping[str, int], targets: Iterable[Load], max_per_move: int = 1000
) -> list[Move]:
    """Moves that empty the draining `sources` (name -> queued tasks to give away) onto
    `targets`: every task goes, one at a time, to the target whose pressure after taking
    it is lowest (least pressure first; ties by name), so the new topology fills evenly.
    A move carries at most `max_per_move` tasks (one transfer each)."""
    if max_per_move < 1:
        raise ValueError("max_per_move must be >= 1")
    loads = {x.name: x for x in targets if x.name not in sources}
    if not loads:
        return []
    total = {n: x.running + x.queued for n, x in loads.items()}
    heap = [((total[n] + 1) / x.cpus, n) for n, x in loads.items()]
    heapq.heapify(heap)
    moved: Counter[tuple[str, str]] = Counter()
    for source in sorted(sources):
        for _ in range(max(0, sources[source])):
            _, dst = heapq.heappop(heap)
            total[dst] += 1
            moved[(source, dst)] += 1
            heapq.heappush(heap, ((total[dst] + 1) / loads[dst].cpus, dst))
    moves: list[Move] = []
    for (s, t), k in sorted(moved.items()):
        while k > 0:
            step = min(k, max_per_move)
            moves.append(Move(s, t, step))
            k -= step
    return moves
