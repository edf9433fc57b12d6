"""The balancing policies in an idealised event model: no CPU contention, no network.

    python bench/balancing_model.py                  # old vs new policy, all workloads
    python bench/balancing_model.py --interval 0.2 --round 0.02

Same servers and workloads as bench/balancing_quality.py (seed 5, 10 servers), simulated:
each server runs its queue on its CPU slots (`fifo` for the old policy, `longest-first`
for the new one); the balancer rebalances when work is submitted and every `--interval`
seconds; a round sees an instantaneous snapshot (running tasks' declared time left, queued
declared durations) and its moves land `--round` seconds later, as the donor then has
them (a task that started meanwhile stays). Tasks run their *actual* duration (the
`wrong` workload's declarations are off by up to +-50 %). What it isolates is the
policy: the real-cluster benchmark adds wave and transfer latency and a shared CPU.

Prints makespan / lower bound per workload and writes bench/results/balancing_model.json.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.count_policy.count_policy_impl import plan_moves_by_count
from bench.waves_scale import bench_topology
from treewave.core.policy import Load, plan_moves
from treewave.experiment.workloads import Workload, all_workloads

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "balancing_model.json"


@dataclass(order=True)
class Job:
    key: tuple[float, int]
    declared: float = field(compare=False)
    actual: float = field(compare=False)


@dataclass
class Server:
    name: str
    cpus: int
    longest_first: bool
    queue: list[Job] = field(default_factory=list)
    running: dict[int, tuple[float, Job]] = field(default_factory=dict)
    """slot end event id -> (start time, job)"""

    def enqueue(self, job: Job) -> None:
        if self.longest_first:
            job.key = (-job.declared, job.key[1])
            bisect.insort(self.queue, job)
        else:
            self.queue.append(job)


def simulate(
    servers: dict[str, int],
    w: Workload,
    policy: str,
    interval: float,
    round_s: float,
) -> dict[str, Any]:
    new = policy == "new"
    state = {n: Server(n, c, new) for n, c in servers.items()}
    seq = itertools.count()
    events: list[tuple[float, int, str, Any]] = []
    for b in w.batches:
        heapq.heappush(events, (b.at_s, next(seq), "arrive", b))
    heapq.heappush(events, (interval, next(seq), "tick", None))
    remaining = w.tasks
    moved = 0
    now = 0.0
    last_end = 0.0

    def start_slots(s: Server, t: float) -> None:
        while len(s.running) < s.cpus and s.queue:
            job = s.queue.pop(0)
            eid = next(seq)
            s.running[eid] = (t, job)
            heapq.heappush(events, (t + job.actual, eid, "finish", s.name))

    def plan(t: float) -> list[Any]:
        loads = [
            Load(
                s.name,
                s.cpus,
                tuple(max(0.0, j.declared - (t - st)) for st, j in s.running.values()),
                tuple(j.declared for j in s.queue),
            )
            for s in state.values()
        ]
        return list(plan_moves(loads) if new else plan_moves_by_count(loads))

    while events and remaining > 0:
        now, eid, kind, data = heapq.heappop(events)
        if kind == "finish":
            s = state[data]
            s.running.pop(eid)
            remaining -= 1
            last_end = now
            start_slots(s, now)
        elif kind == "arrive":
            s = state[data.node]
            for _ in range(data.count):
                s.enqueue(Job((0.0, next(seq)), data.duration_s, data.run_s))
            start_slots(s, now)
            heapq.heappush(events, (now + 1e-9, next(seq), "round", None))
        elif kind in ("tick", "round"):
            if kind == "tick":
                heapq.heappush(events, (now + interval, next(seq), "tick", None))
            moves = plan(now)
            if moves:
                heapq.heappush(events, (now + round_s, next(seq), "apply", moves))
        elif kind == "apply":
            for m in data:
                src, dst = state[m.source], state[m.target]
                if m.durations is None:
                    take = [src.queue.pop() for _ in range(min(m.tasks, len(src.queue)))]
                else:
                    take = []
                    for d in m.durations:
                        if not src.queue:
                            break
                        best = min(
                            range(len(src.queue)),
                            key=lambda i: (abs(src.queue[i].declared - d), -i),
                        )
                        take.append(src.queue.pop(best))
                for job in reversed(take):
                    dst.enqueue(job)
                moved += len(take)
                start_slots(dst, now)
    return {"makespan_s": last_end, "tasks_moved": moved}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--servers", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--round", type=float, default=0.02, help="snapshot-to-moves latency, s")
    ap.add_argument("--target", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    topo = bench_topology(args.servers, "balanced", seed=args.seed)
    servers = {s.name: s.cpus for s in topo.servers}
    cpus = sum(servers.values())
    rows: dict[str, dict[str, Any]] = {}
    print(f"{'workload':<14} {'LB s':>5} | {'old':>6} {'moved':>5} | {'new':>6} {'moved':>5}")
    for w in all_workloads(servers, args.seed, args.target):
        lb = w.lower_bound(cpus)
        row: dict[str, Any] = {"lower_bound_s": lb}
        for policy in ("old", "new"):
            r = simulate(servers, w, policy, args.interval, args.round)
            r["ratio"] = r["makespan_s"] / lb
            row[policy] = r
        rows[w.name] = row
        print(
            f"{w.name:<14} {lb:>5.2f} | {row['old']['ratio']:>6.3f} "
            f"{row['old']['tasks_moved']:>5} | {row['new']['ratio']:>6.3f} "
            f"{row['new']['tasks_moved']:>5}"
        )
    worst = max(r["new"]["ratio"] for r in rows.values())
    print(
        f"new: median {statistics.median(r['new']['ratio'] for r in rows.values()):.3f}, "
        f"worst {worst:.3f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python -m bench.balancing_model " + " ".join(sys.argv[1:]),
                "servers": servers,
                "interval_s": args.interval,
                "round_s": args.round,
                "workloads": rows,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
