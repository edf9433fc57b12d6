"""The balancing policy: a pure function from an Echo snapshot to moves of queued tasks.

It balances **expected work**, not task counts (see `core.load`): every server runs its
queue longest-first on its CPU slots (list scheduling), so its *expected finish time* is
that of LPT on its slots, each slot first busy with what is left of its running task.
The policy minimises the largest expected finish time over the cluster (the expected
makespan):

1. Global LPT: every queued task, longest first, goes to the CPU slot (of any server)
   that frees up first, its own server winning ties. This is LPT on machines with
   different available times, within (3/2 - 1/(2m)) of the optimal makespan over m slots
   (C.-Y. Lee, "Parallel machines scheduling with nonsimultaneous machine available
   time", Discrete Applied Mathematics 30 (1991) 53-61). Then the same again, except that
   a task stays on its own server whenever it would finish there by the first plan's
   makespan anyway; that "sticky" plan is used when it is no worse (it moves far fewer
   tasks, and work does not ping-pong between rounds).
2. The plan is taken only if its expected makespan is lower than the current one;
   otherwise the current placement is kept (it is then at least as good).
3. Local search: while the most loaded server can lower its finish time by giving one
   queued task to another server without lifting that one to its level, it does.

So the expected makespan never rises, running tasks never move, and the result is within
the LPT bound of the optimum. Moves name the durations to take; the donor reserves, for
each, the queued task of closest expected duration (`TaskLedger.prepare`).
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from treewave.core.load import pressure_of, queued_durations, running_left
from treewave.core.messages import ServerState

__all__ = [
    "DrainMove",
    "Load",
    "Move",
    "apply_moves",
    "expected_makespan",
    "finish_time",
    "imbalance",
    "loads_of",
    "lpt_bound",
    "max_pressure",
    "plan_drain",
    "plan_moves",
]

LOCAL_SEARCH_STEPS = 200
"""At most this many single-task improvements after the LPT step (each is cheap)."""
LOCAL_SEARCH_CANDIDATES = 6
"""Distinct durations (and targets) tried per improvement step."""
_EPS = 1e-9


def lpt_bound(slots: int) -> float:
    """Lee's worst-case ratio of LPT with different slot available times: 3/2 - 1/(2m)."""
    return 1.5 - 1 / (2 * max(slots, 1))


@dataclass(frozen=True, slots=True)
class Move:
    """Give `target` one queued task of (about) each of `durations` from `source`; or,
    with `durations=None`, `count` queued tasks, the last in run order (policies that count
    tasks rather than work: `Move.by_count`)."""

    source: str
    target: str
    durations: tuple[float, ...] | None
    count: int = 0

    @classmethod
    def by_count(cls, source: str, target: str, count: int) -> Move:
        return cls(source, target, None, count)

    @property
    def tasks(self) -> int:
        return self.count if self.durations is None else len(self.durations)


@dataclass(frozen=True, slots=True)
class Load:
    """What the policy needs of a server: its slots, the expected seconds left of each
    running task, and the expected durations of its queued tasks (any order)."""

    name: str
    cpus: int
    running_left: tuple[float, ...] = ()
    queued: tuple[float, ...] = ()

    @property
    def work_s(self) -> float:
        return sum(self.running_left) + sum(self.queued)

    @property
    def pressure(self) -> float:
        return pressure_of(self.work_s, self.cpus)

    @property
    def finish_s(self) -> float:
        return finish_time(self.cpus, self.running_left, self.queued)


def loads_of(states: Iterable[ServerState], task_time_s: float) -> list[Load]:
    return [
        Load(
            s.name,
            s.cpus,
            tuple(running_left(s, task_time_s)),
            tuple(queued_durations(s, task_time_s)),
        )
        for s in states
    ]


def finish_time(cpus: int, running: Sequence[float], queued: Iterable[float]) -> float:
    """When the server is expected to be idle: its queue, longest first, each task on the
    slot that frees up first (what the server does with `queue_order` longest-first)."""
    ends = sorted(running)
    slots = max(cpus, len(ends))
    ends = [0.0] * (slots - len(ends)) + ends
    heapq.heapify(ends)
    for d in sorted(queued, reverse=True):
        heapq.heapreplace(ends, ends[0] + d)
    return max(ends, default=0.0)


def expected_makespan(loads: Iterable[Load]) -> float:
    return max((x.finish_s for x in loads), default=0.0)


def max_pressure(loads: Iterable[Load]) -> float:
    return max((x.pressure for x in loads), default=0.0)


def imbalance(loads: Iterable[Load]) -> float:
    """Maximum pressure minus the cluster-wide pressure (0 when perfectly even)."""
    loads = list(loads)
    if not loads:
        return 0.0
    cluster = pressure_of(sum(x.work_s for x in loads), sum(x.cpus for x in loads))
    return max_pressure(loads) - cluster


def plan_moves(loads: Iterable[Load]) -> list[Move]:
    """Moves of queued tasks that lower the expected makespan; see the module docstring."""
    servers = {x.name: x for x in loads}
    if len(servers) < 2 or not any(x.queued for x in servers.values()):
        return []
    current = {n: list(x.queued) for n, x in servers.items()}
    finish = {n: x.finish_s for n, x in servers.items()}
    plan, plan_finish = _lpt(servers)
    sticky, sticky_finish = _lpt(servers, stay_until=max(plan_finish.values()))
    if max(sticky_finish.values()) <= max(plan_finish.values()) + _EPS:
        plan, plan_finish = sticky, sticky_finish
    if max(plan_finish.values()) < max(finish.values()) - _EPS:
        queues, finish = plan, plan_finish
    else:
        queues = {n: list(q) for n, q in current.items()}
    _improve(servers, queues, finish)
    return _moves_between(current, queues)


def _lpt(
    servers: dict[str, Load], stay_until: float = 0.0
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Every queued task, longest first, on the earliest free slot, except that it stays on
    its own server when it would finish there by `stay_until` anyway (or on a tie).
    Returns the queues and each server's expected finish time."""
    slots: dict[str, list[float]] = {}
    for n, x in servers.items():
        ends = sorted(x.running_left)
        ends = [0.0] * (max(x.cpus, len(ends)) - len(ends)) + ends
        heapq.heapify(ends)
        slots[n] = ends
    earliest = [(ends[0], n) for n, ends in slots.items()]
    heapq.heapify(earliest)
    tasks = sorted(((d, n) for n, x in servers.items() for d in x.queued), reverse=True)
    plan: dict[str, list[float]] = {n: [] for n in servers}
    for d, owner in tasks:
        while earliest[0][0] != slots[earliest[0][1]][0]:
            # A stale entry: every server's current time was pushed when it changed, so
            # dropping it loses nothing (re-pushing it grew the heap with every task).
            heapq.heappop(earliest)
        stay = slots[owner][0] <= earliest[0][0] + _EPS or slots[owner][0] + d <= stay_until
        to = owner if stay else earliest[0][1]
        heapq.heapreplace(slots[to], slots[to][0] + d)
        heapq.heappush(earliest, (slots[to][0], to))
        plan[to].append(d)
    finish = {n: finish_time(x.cpus, x.running_left, plan[n]) for n, x in servers.items()}
    return plan, finish


def _improve(
    servers: dict[str, Load], queues: dict[str, list[float]], finish: dict[str, float]
) -> None:
    """Single-task moves off the most loaded server while one strictly lowers it without
    lifting the recipient to its level (each step lowers the sorted finish-time vector)."""

    def fin(n: str, q: Sequence[float]) -> float:
        x = servers[n]
        return finish_time(x.cpus, x.running_left, q)

    for _ in range(LOCAL_SEARCH_STEPS):
        src = max(finish, key=lambda n: finish[n])
        top = finish[src]
        if not queues[src]:
            return
        targets = sorted((n for n in servers if n != src), key=lambda n: finish[n])
        best: tuple[float, float, str, float, float] | None = None
        for d in sorted(set(queues[src]), reverse=True)[:LOCAL_SEARCH_CANDIDATES]:
            rest = list(queues[src])
            rest.remove(d)
            f_src = fin(src, rest)
            if f_src >= top - _EPS:
                continue
            for t in targets[:LOCAL_SEARCH_CANDIDATES]:
                f_t = fin(t, [*queues[t], d])
                worst = max(f_src, f_t)
                if worst < top - _EPS and (best is None or worst < best[0] - _EPS):
                    best = (worst, d, t, f_src, f_t)
        if best is None:
            return
        _, d, t, f_src, f_t = best
        queues[src].remove(d)
        queues[t].append(d)
        finish[src], finish[t] = f_src, f_t


def _moves_between(before: dict[str, list[float]], after: dict[str, list[float]]) -> list[Move]:
    """The fewest task moves turning `before` into `after` (equal durations are
    interchangeable), grouped into one move per (source, target)."""
    grouped: dict[tuple[str, str], list[float]] = defaultdict(list)
    durations = {d for q in after.values() for d in q}
    have = {n: Counter(q) for n, q in before.items()}
    want = {n: Counter(q) for n, q in after.items()}
    for d in sorted(durations, reverse=True):
        give = [(n, have[n][d] - want[n][d]) for n in before if have[n][d] > want[n][d]]
        take = [(n, want[n][d] - have[n][d]) for n in before if want[n][d] > have[n][d]]
        gi = ti = 0
        while gi < len(give) and ti < len(take):
            (src, g), (dst, k) = give[gi], take[ti]
            n = min(g, k)
            grouped[(src, dst)] += [d] * n
            give[gi], take[ti] = (src, g - n), (dst, k - n)
            gi += give[gi][1] == 0
            ti += take[ti][1] == 0
    return [Move(s, t, tuple(ds)) for (s, t), ds in sorted(grouped.items())]


def apply_moves(loads: Iterable[Load], moves: Iterable[Move]) -> list[Load]:
    """The loads after the moves (for reporting and tests); a move naming a duration its
    source has not queued, or more tasks than it has queued, is a `ValueError`. A move by
    count takes the source's last queued tasks (`queued` in run order, as `loads_of`
    gives it)."""
    by = {x.name: x for x in loads}
    queues = {n: list(x.queued) for n, x in by.items()}
    for m in moves:
        if m.durations is None:
            if m.count > len(queues[m.source]):
                raise ValueError(f"{m.source} has fewer than {m.count} queued tasks to move")
            cut = len(queues[m.source]) - m.count
            queues[m.target] += queues[m.source][cut:]
            del queues[m.source][cut:]
            continue
        for d in m.durations:
            try:
                queues[m.source].remove(d)
            except ValueError:
                raise ValueError(f"{m.source} has no queued task of {d} s to move") from None
            queues[m.target].append(d)
    return [Load(n, x.cpus, x.running_left, tuple(queues[n])) for n, x in by.items()]


@dataclass(frozen=True, slots=True)
class DrainMove:
    """`tasks` queued tasks of a server leaving the topology, to `target`."""

    source: str
    target: str
    tasks: int


def plan_drain(
    sources: Mapping[str, int],
    targets: Iterable[Load],
    task_s: float,
    max_per_move: int = 1000,
) -> list[DrainMove]:
    """Moves that empty the draining `sources` (name -> queued tasks to give away) onto
    `targets`: every task (counted as `task_s` of work) goes, one at a time, to the target
    whose pressure after taking it is lowest (least pressure first; ties by name), so the
    new topology fills evenly. A move carries at most `max_per_move` tasks."""
    if max_per_move < 1:
        raise ValueError("max_per_move must be >= 1")
    loads = {x.name: x for x in targets if x.name not in sources}
    if not loads:
        return []
    work = {n: x.work_s for n, x in loads.items()}
    heap = [((work[n] + task_s) / x.cpus, n) for n, x in loads.items()]
    heapq.heapify(heap)
    moved: Counter[tuple[str, str]] = Counter()
    for source in sorted(sources):
        for _ in range(max(0, sources[source])):
            _, dst = heapq.heappop(heap)
            work[dst] += task_s
            moved[(source, dst)] += 1
            heapq.heappush(heap, ((work[dst] + task_s) / loads[dst].cpus, dst))
    moves: list[DrainMove] = []
    for (s, t), k in sorted(moved.items()):
        while k > 0:
            step = min(k, max_per_move)
            moves.append(DrainMove(s, t, step))
            k -= step
    return moves
