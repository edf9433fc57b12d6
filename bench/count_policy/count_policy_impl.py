"""The balancing policy as it was before expected work (benchmark comparison only).

Greedy on task counts ((running + queued) / cpus): repeatedly take one queued task from
the most pressed server and give it to the server whose count pressure after taking it is
lowest, while that stays strictly below the donor's. Moves name only a count: the donor
gives its most recently queued tasks. Run with `queue_order: fifo`, as servers ran then.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CountMove:
    source: str
    target: str
    tasks: int
    durations: None = None


def plan_moves_by_count(loads: Iterable[Any], max_moves: int = 100_000) -> list[CountMove]:
    servers = {x.name: x for x in loads}
    if len(servers) < 2:
        return []
    total = {n: len(x.running_left) + len(x.queued) for n, x in servers.items()}
    queued = {n: len(x.queued) for n, x in servers.items()}
    cpus = {n: x.cpus for n, x in servers.items()}
    donors = [(-total[n] / cpus[n], n) for n in servers if queued[n] > 0]
    takers = [((total[n] + 1) / cpus[n], n) for n in servers]
    heapq.heapify(donors)
    heapq.heapify(takers)
    moved: Counter[tuple[str, str]] = Counter()
    steps = 0
    while donors and steps < max_moves:
        neg_p, src = donors[0]
        if -neg_p != total[src] / cpus[src] or queued[src] == 0:
            heapq.heappop(donors)
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
    return [CountMove(s, t, k) for (s, t), k in sorted(moved.items()) if k > 0]


def _best_taker(
    takers: list[tuple[float, str]], total: dict[str, int], cpus: dict[str, int], exclude: str
) -> str | None:
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
