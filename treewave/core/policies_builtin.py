"""The built-in balancing policies other than `lpt`: `count`, `lab` and `steal`.

Each is pure (an Echo snapshot as `Load`s and the settings in, moves out), so the balancer,
`treewave experiment`'s model and the property tests run the same code. They exist to be
compared with `lpt` (`core.policy.plan_moves`): treewave's first policy, the lab's own
method, and work stealing as Dask's scheduler does it. Registered in `core.policies`.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from treewave.core.policy import Load, Move
from treewave.core.topology import Settings

__all__ = ["CountPolicy", "LabPolicy", "StealPolicy", "plan_by_count"]

MAX_COUNT_MOVES = 100_000
"""At most this many single-task steps in one `count` plan."""
STEAL_VICTIMS_TOP = 10
"""Dask: without saturated workers, victims are sought among the 10 most occupied."""
STEAL_MIN_OCCUPANCY_S = 0.2
"""Dask: a victim (when none is saturated) has at least this much expected work."""


def _grouped(moved: Counter[tuple[str, str]]) -> list[Move]:
    return [Move.by_count(s, t, k) for (s, t), k in sorted(moved.items()) if k > 0]


# --- count -------------------------------------------------------------------------------


def plan_by_count(loads: Sequence[Load], max_moves: int = MAX_COUNT_MOVES) -> list[Move]:
    """Greedy on task counts ((running + queued) / cpus): repeatedly one queued task from
    the most pressed server to the server whose count pressure after taking it is lowest,
    while that stays strictly below the donor's. Moves name only a count."""
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
        if -neg_p != total[src] / cpus[src] or queued[src] == 0:  # stale or empty
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
    return _grouped(moved)


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


@dataclass(frozen=True)
class CountPolicy:
    """treewave's first policy: even task counts per cpu, whatever the tasks' durations."""

    name: str = "count"
    description: str = "even task counts per cpu (treewave's first policy; ignores durations)"

    def plan(self, loads: Sequence[Load], settings: Settings) -> list[Move]:
        return plan_by_count(loads)


# --- lab ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabPolicy:
    """The lab's own method, its decision rule only.

    Load is a bare count (running + queued tasks). A server is overloaded when its load
    reaches cpus x `overload_percent` / 100. Servers sit in a heap by load per cpu; each
    overloaded server, most loaded first, gives ONE queued task per round to the server
    with the most free cpu (cpus - load, which must be positive), and both loads are
    updated before the next donor. Work (durations) is never looked at.

    The lab's README keys its heap by `-(cpu/load)` (cpus per task, negated: that pops the
    server with the MOST cpus per task, i.e. the least loaded, first) while saying that the
    most loaded servers come first; this implements the stated intent (load / cpu, largest
    first). The lab's duplication bug (the recipient added a task before the donor checked
    it had one) is not reproduced: moves go through treewave's two-phase transfers.
    """

    name: str = "lab"
    description: str = "the lab's heap method: one task per overloaded server per round"

    def plan(self, loads: Sequence[Load], settings: Settings) -> list[Move]:
        servers = {x.name: x for x in loads}
        if len(servers) < 2:
            return []
        load = {n: len(x.running_left) + len(x.queued) for n, x in servers.items()}
        queued = {n: len(x.queued) for n, x in servers.items()}
        cpus = {n: x.cpus for n, x in servers.items()}
        heap = [(-load[n] / cpus[n], n) for n in sorted(servers)]
        heapq.heapify(heap)
        moved: Counter[tuple[str, str]] = Counter()
        while heap:
            _, src = heapq.heappop(heap)
            if load[src] < cpus[src] * settings.overload_percent / 100 or queued[src] == 0:
                continue
            dst = max(
                (n for n in servers if n != src), key=lambda n: (cpus[n] - load[n], -load[n], n)
            )
            if cpus[dst] - load[dst] <= 0:
                continue
            load[src] -= 1
            queued[src] -= 1
            load[dst] += 1
            moved[(src, dst)] += 1
        return _grouped(moved)


# --- steal -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StealPolicy:
    """Work stealing in the manner of Dask's scheduler (`distributed/stealing.py`,
    `WorkStealing.balance`, with its `Scheduler.is_unoccupied`/`check_idle_saturated`).

    Occupancy is a server's expected work (running time left + queued durations). Only
    idle servers steal: fewer tasks than cpus, or occupancy below half of cpus x the
    cluster's mean occupancy per cpu. Victims are the saturated servers (more tasks than
    cpus and a pending share of work above 0.4 s and 1.9x the mean per cpu), else the ten
    most occupied with more tasks than cpus; most occupied first. For each queued task of
    a victim (longest first), the thief is the idle server of least occupancy per cpu, and
    the task moves when occ(thief) + d <= occ(victim) - d / 2 (no data to transfer, so the
    communication costs are zero). A thief that is no longer idle stops stealing.
    """

    name: str = "steal"
    description: str = "work stealing as Dask does it: idle servers take from the busiest"

    def plan(self, loads: Sequence[Load], settings: Settings) -> list[Move]:
        servers = {x.name: x for x in loads}
        total_cpus = sum(x.cpus for x in servers.values())
        if len(servers) < 2 or total_cpus == 0:
            return []
        occ = {n: x.work_s for n, x in servers.items()}
        nproc = {n: len(x.running_left) + len(x.queued) for n, x in servers.items()}
        mean = sum(occ.values()) / total_cpus

        def idle(n: str) -> bool:
            c = servers[n].cpus
            return nproc[n] < c or occ[n] < c * mean / 2

        def saturated(n: str) -> bool:
            c, p = servers[n].cpus, nproc[n]
            if idle(n) or p <= c:
                return False
            pending = occ[n] * (p - c) / (p * c)
            return pending > 0.4 and pending > 1.9 * mean

        thieves = {n for n in servers if idle(n)}
        if not thieves or len(thieves) == len(servers):
            return []
        victims = [n for n in servers if saturated(n)]
        if not victims:
            top = sorted(servers, key=lambda n: (-occ[n], n))[:STEAL_VICTIMS_TOP]
            victims = [
                n
                for n in top
                if occ[n] > STEAL_MIN_OCCUPANCY_S
                and nproc[n] > servers[n].cpus
                and n not in thieves
            ]
        victims.sort(key=lambda n: (-occ[n], n))
        stolen: dict[tuple[str, str], list[float]] = {}
        for victim in victims:
            for d in sorted(servers[victim].queued, reverse=True):
                if not thieves:
                    break
                thief = min(thieves, key=lambda n: (occ[n] / servers[n].cpus, n))
                if occ[thief] + d <= occ[victim] - d / 2:
                    stolen.setdefault((victim, thief), []).append(d)
                    occ[thief] += d
                    occ[victim] -= d
                    nproc[thief] += 1
                    nproc[victim] -= 1
                    if not idle(thief):
                        thieves.discard(thief)
        return [Move(s, t, tuple(ds)) for (s, t), ds in sorted(stolen.items())]
