"""Every balancing policy in the idealised event model (no CPU contention, no network).

    python -m bench.balancing_model                          # all built-in policies
    python -m bench.balancing_model --policies lpt lab --interval 0.5 --round 0.02

Same servers and workloads as bench/balancing_quality.py (seed 5, 10 servers), run by
`treewave experiment`'s model runner (treewave/experiment/model.py, one copy of the model
and its arrival loop): each server runs its queue on its CPU slots, longest first; the
balancer rebalances when work is submitted and every `--interval` seconds; a round sees an
instantaneous snapshot and its moves land `--round` seconds later. What it isolates is the
policy: the real-cluster benchmark adds wave and transfer latency and a shared CPU.

Prints makespan / lower bound and tasks moved per workload and policy, and writes
bench/results/balancing_model.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.waves_scale import bench_topology
from treewave.core.policies import get_policy, policy_names
from treewave.core.topology import Settings
from treewave.experiment.model import simulate
from treewave.experiment.workloads import all_workloads

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "balancing_model.json"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--servers", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--round", type=float, default=0.02, help="snapshot-to-moves latency, s")
    ap.add_argument("--target", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--policies", nargs="*", default=None, help="default: every built-in")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    policies = args.policies or policy_names()[:4]
    topo = bench_topology(args.servers, "balanced", seed=args.seed)
    servers = {s.name: s.cpus for s in topo.servers}
    settings = Settings(rebalance_interval_s=args.interval)
    rows: dict[str, dict[str, Any]] = {}
    print(f"{'workload':<14} {'LB s':>5} | " + " | ".join(f"{p:>6} {'moved':>5}" for p in policies))
    for w in all_workloads(servers, args.seed, args.target):
        row: dict[str, Any] = {"lower_bound_s": w.lower_bound(sum(servers.values()))}
        for p in policies:
            r = simulate(servers, w, get_policy(p), settings, args.round, args.seed)
            row[p] = {"makespan_s": r.makespan_s, "ratio": r.ratio, "tasks_moved": r.tasks_moved}
        rows[w.name] = row
        print(
            f"{w.name:<14} {row['lower_bound_s']:>5.2f} | "
            + " | ".join(f"{row[p]['ratio']:>6.3f} {row[p]['tasks_moved']:>5}" for p in policies)
        )
    for p in policies:
        ratios = [r[p]["ratio"] for r in rows.values()]
        print(f"{p}: median {statistics.median(ratios):.3f}, worst {max(ratios):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python -m bench.balancing_model " + " ".join(sys.argv[1:]),
                "servers": servers,
                "interval_s": args.interval,
                "round_s": args.round,
                "policies": policies,
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
