"""How well the cluster is balanced: makespan against the lower bound, treewave vs Dask.

    python -m bench.balancing_quality --interval 0.2 --no-none  # count vs lpt vs Dask
    python -m bench.balancing_quality --servers 10 --interval 0.5 --workloads skewed-fixed
    python -m bench.balancing_quality --no-dask --policies lpt  # the current policy only
    python -m bench.balancing_quality --no-dask --policies lpt count lab steal

Needs Dask for the comparison: `pip install -e '.[bench]'`.

One random tree of `--servers` servers (1-4 cpus each, seeded) and the seeded workloads of
bench/workloads.py (skewed / Zipf-like / bursts, fixed / varied task durations, about 4 s
of work per cpu; declarations wrong by up to +-50 %; a stream of arrivals over 6 s). Each
workload runs on

- treewave, no balancing (`treewave run --rebalance-interval 0`): tasks stay where they land;
- each policy of `--policies` (default: `count`, the policy treewave had before it
  balanced expected work, run with FIFO queues as then; and `lpt`, the current one, with
  longest-first queues), chosen through `settings.policy` in the topology file and
  rebalancing every `--interval`: `treewave experiment`'s local runner
  (treewave/experiment/local.py and drive.py: the same cluster launch, arrival loop and
  polling);
- Dask distributed: a local cluster of one worker process (Nanny) per server with as many
  threads as the server has cpus (started individually, since cpus differ), tasks are
  `time.sleep(duration)`, each submitted to the worker standing for the server the
  workload names with `workers=[addr], allow_other_workers=True`, so work stealing may
  move them. A fresh Dask cluster per workload (its duration estimates start cold, like
  treewave's policy that knows none).

Makespan runs from the first submission until every task is done: for treewave, the end of
the first poll of every server's `/api/state` (every 20 ms) that finds all work completed
(the local runner's definition);
for Dask, when `distributed.wait` returns. It is divided by the lower bound: for every
arrival time a, a + (work arriving from a on) / total cpus, and a + d for each task; with
all work at time 0 that is max(total work / total cpus, longest task). Tasks moved are the
servers' `transferred_in` deltas; messages are the balancer's wave-message counter deltas
(Echo for snapshots, during the run only).

Prints a table and writes bench/results/balancing_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.waves_scale import bench_topology
from tests.support.http import get_text
from treewave.core.topology import Topology
from treewave.experiment.drive import run_workload
from treewave.experiment.local import LocalCluster, local_cluster
from treewave.experiment.run import with_policy
from treewave.experiment.workloads import Batch, Workload, all_workloads

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "balancing_quality.json"
SEED = 5
POLL_S = 0.02
RUN_TIMEOUT_S = 120.0


def _with(topo: Topology, **settings: Any) -> Topology:
    data = topo.to_json_data()
    data["settings"] = {**data["settings"], **settings}
    return Topology.parse(data, "topology")


def paced(w: Workload, t0: float) -> Iterator[tuple[Batch, ...]]:
    """The workload's arrivals, each one's batches handed out at its time (`t0` plus its
    `at_s`, or at once when that has passed): the same pace for treewave and for Dask."""
    for at, batches in w.arrivals():
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield batches


# --- treewave ---------------------------------------------------------------------------------


def balancer_counters(c: LocalCluster) -> dict[str, float]:
    text = get_text(c.url + "/metrics", timeout=10)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("treewave_wave_messages_total", "treewave_rebalance_runs_total")):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def run_treewave(c: LocalCluster, w: Workload, policy: str) -> dict[str, Any]:
    counters0 = balancer_counters(c)
    r = run_workload(c, w, policy, w.seed)
    counters1 = balancer_counters(c)
    delta = {k: counters1.get(k, 0) - counters0.get(k, 0) for k in counters1}
    return {
        "makespan_s": r.makespan_s,
        "tasks_moved": r.tasks_moved,
        "wave_messages": int(
            sum(v for k, v in delta.items() if k.startswith("treewave_wave_messages"))
        ),
        "rebalance_rounds": int(delta.get("treewave_rebalance_runs_total", 0)),
        "completed": r.tasks,
        "reported_policy": r.reported_policy,
    }


# --- Dask ---------------------------------------------------------------------------------------


def run_dask(servers: dict[str, int], w: Workload) -> dict[str, Any]:
    import logging

    from distributed import Client, Nanny, Scheduler, SpecCluster, wait

    logging.getLogger("distributed").setLevel(logging.ERROR)
    spec = {
        name: {"cls": Nanny, "options": {"nthreads": cpus, "host": "127.0.0.1"}}
        for name, cpus in servers.items()
    }
    sched = {"cls": Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
    with (
        SpecCluster(workers=spec, scheduler=sched, silence_logs=logging.ERROR) as cl,
        Client(cl) as client,
    ):
        client.wait_for_workers(len(servers))
        info = client.scheduler_info(n_workers=-1)["workers"]
        addr = {v["name"]: a for a, v in info.items()}
        futures = []
        t0 = time.monotonic()
        for batches in paced(w, t0):
            for b in batches:
                futures += client.map(
                    time.sleep,
                    [b.run_s] * b.count,
                    workers=[addr[b.node]],
                    allow_other_workers=True,
                    pure=False,
                )
        wait(futures)
        end = time.monotonic()
        wanted = {f.key: addr[b.node] for f, b in zip(futures, _expand(w), strict=True)}
        ran_on = client.run_on_scheduler(_ran_on, keys=list(wanted))
    moved = sum(1 for k, a in wanted.items() if ran_on.get(k) not in (None, a))
    return {"makespan_s": end - t0, "tasks_moved": moved, "completed": len(futures)}


def _expand(w: Workload) -> list[Any]:
    """One entry per task, in submission order (time, then batch order)."""
    out = []
    for _, batches in w.arrivals():
        for b in batches:
            out += [b] * b.count
    return out


def _ran_on(dask_scheduler: Any, keys: list[Any]) -> dict[Any, str]:
    """Where each finished task's result lives, i.e. the worker that ran it."""
    out = {}
    for k in keys:
        ts = dask_scheduler.tasks.get(k)
        if ts is not None and ts.who_has:
            out[k] = next(iter(ts.who_has)).address
    return out


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--servers", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.5, help="treewave rebalance interval, s")
    ap.add_argument("--target", type=float, default=4.0, help="seconds of work per cpu")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--workloads", nargs="*", default=None, help="names, e.g. skewed-fixed")
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--no-none", action="store_true", help="skip the no-balancing runs")
    ap.add_argument(
        "--policies", nargs="*", default=["count", "lpt"], help="treewave policies to run"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    topo = bench_topology(args.servers, "balanced", seed=args.seed)
    servers = {s.name: s.cpus for s in topo.servers}
    cpus = topo.total_cpus
    workloads = [
        w
        for w in all_workloads(servers, args.seed, args.target)
        if args.workloads is None or w.name in args.workloads
    ]
    print(
        f"{len(servers)} servers, {cpus} cpus: "
        + ", ".join(f"{n}:{c}" for n, c in servers.items()),
        flush=True,
    )
    load_start = os.getloadavg()
    rows: dict[str, dict[str, Any]] = {
        w.name: {
            "tasks": w.tasks,
            "work_s": round(w.work_s, 3),
            "longest_s": w.longest_s,
            "lower_bound_s": w.lower_bound(cpus),
            "classic_bound_s": w.classic_bound(cpus),
            "batches": len(w.batches),
            "initial_servers": sorted({b.node for b in w.batches}),
        }
        for w in workloads
    }
    modes: list[tuple[str, Topology]] = []
    if not args.no_none:
        modes.append(("none", _with(topo, rebalance_interval_s=0.0)))
    for policy in args.policies:
        # count ran with FIFO queues, as servers ran then; the others longest first.
        order = "fifo" if policy == "count" else "longest-first"
        modes.append(
            (
                policy,
                with_policy(
                    _with(topo, rebalance_interval_s=args.interval, queue_order=order), policy
                ),
            )
        )
    for mode, mode_topo in modes:
        with local_cluster(mode_topo) as c:
            for w in workloads:
                r = run_treewave(c, w, "lpt" if mode == "none" else mode)
                if mode != "none" and r["reported_policy"] != mode:
                    # The old column once silently ran the new policy: never again.
                    raise RuntimeError(
                        f"the balancer reports policy {r['reported_policy']!r}, not {mode!r}"
                    )
                r["ratio"] = r["makespan_s"] / rows[w.name]["lower_bound_s"]
                rows[w.name][mode] = r
                print(
                    f"  {mode:<8} {w.name:<14} makespan {r['makespan_s']:.2f} s "
                    f"x{r['ratio']:.3f}, moved {r['tasks_moved']}, msgs {r['wave_messages']}, "
                    f"balancer ran {r['reported_policy']}",
                    flush=True,
                )
                time.sleep(0.5)
    if not args.no_dask:
        for w in workloads:
            r = run_dask(servers, w)
            r["ratio"] = r["makespan_s"] / rows[w.name]["lower_bound_s"]
            rows[w.name]["dask"] = r
            print(
                f"  dask     {w.name:<14} makespan {r['makespan_s']:.2f} s x{r['ratio']:.3f}",
                flush=True,
            )
    load_end = os.getloadavg()

    print()
    print(
        f"Makespan / lower bound, {len(servers)} servers, {cpus} cpus "
        f"(treewave periodic rebalancing every {args.interval:g} s); load average "
        f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end"
    )
    cols = [m for m, _ in modes] + ([] if args.no_dask else ["dask"])
    hdr = f"{'workload':<14} {'tasks':>5} {'LB s':>5} | " + " | ".join(
        f"{m:>6} {'moved':>5}" for m in cols
    )
    print(hdr)
    print("-" * len(hdr))

    def cell(row: dict[str, Any], mode: str) -> str:
        r = row.get(mode, {})
        return f"{r['ratio']:>6.3f} {r.get('tasks_moved', ''):>5}" if r else f"{'':>12}"

    for name, row in rows.items():
        print(
            f"{name:<14} {row['tasks']:>5} {row['lower_bound_s']:>5.2f} | "
            + " | ".join(cell(row, m) for m in cols)
        )
    met_all = True
    if "lpt" in cols:
        for name, row in rows.items():
            goal = 1.10 if name.startswith("wrong") else 1.05
            dask = row.get("dask", {}).get("ratio")
            met_all = (
                met_all
                and row["lpt"]["ratio"] <= goal
                and (dask is None or row["lpt"]["ratio"] < dask)
            )
        ratios = [r["lpt"]["ratio"] for r in rows.values()]
        print(
            f"lpt ratio: median {statistics.median(ratios):.3f}, worst {max(ratios):.3f}; "
            f"targets (<= 1.05, wrong <= 1.10, below Dask) met: {met_all}"
        )
    report = {
        "command": "python -m bench.balancing_quality " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
        },
        "servers": servers,
        "total_cpus": cpus,
        "rebalance_interval_s": args.interval,
        "seed": args.seed,
        "workloads": rows,
        "targets_met": met_all,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
