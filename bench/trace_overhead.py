"""What tracing costs: Echo and Finn with tracing on vs off, and the trace history's memory.

    python -m bench.trace_overhead                  # default topology and 100 servers
    python -m bench.trace_overhead --runs 100 --sizes default

For each topology (the default `topology.json`, and a random 100-server tree) it starts
`treewave run` twice, both up at once: tracing off (`TREEWAVE_TRACE_HISTORY=0` at the
balancer, `TREEWAVE_TRACE_WAVES=0` at every server: nothing recorded, nothing gathered)
and on (the defaults: every API wave traced). After warm-up waves it runs Echo
(`GET /api/tree`) and Finn (`POST /api/finn`, 0 tasks), each wave alternating between the
two clusters (so both see the same machine), and takes the balancer-reported median and
p95. With tracing on, every wave's trace is fetched (`GET /api/waves/{id}`) before the
next wave starts, so the wave figure is the wave's own cost (recording) and the fetch's
time is how long after its wave a trace is ready (gathering and assembling). A trace read
this soon is asked for at once (the servers' push window has not ended): that figure is
the request path's, the CPU figure below the push path's.

CPU per wave (`--cpu-runs`, after the timed waves): back-to-back waves of one kind,
alternating between the clusters, no trace fetched; the CPU time (user + system) of each
cluster's balancer and servers over them (`/proc`), per wave, once the last traces are
gathered. Each cluster's figure includes its idle work (keep-alives, timers) during the
other's waves: the same on both sides.

Memory at the bound: the balancer keeps at most `trace_history` (50) assembled traces;
each server at most `trace_waves` (64) waves of its own events. Both are measured with
tracemalloc on traces of the same topologies built by the simulator (the same format the
balancer stores), half Echo and half Finn.

Writes bench/results/trace_overhead.json and prints a table. Stops every cluster (SIGINT)
however it ends.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.local_waves import Api, git_commit, stats
from bench.waves_scale import Cluster
from tests.support.commands import clean_env
from tests.support.ports import port_free
from tests.support.run import RunProcess, start_run
from treewave.core.messages import FinnWork
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER, Settings, Topology
from treewave.core.trace import DEFAULT_EVENTS_PER_WAVE, TraceRecorder
from treewave.wire.topology_file import load_topology

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "trace_overhead.json"
WARMUP = 10
HISTORY_BOUND = 50
NODE_BOUND = 64
OFF_ENV = {"TREEWAVE_TRACE_HISTORY": "0", "TREEWAVE_TRACE_WAVES": "0"}


def topology_for(size: str) -> Topology:
    if size == "default":
        return load_topology(REPO / "topology.json")
    return random_topology(
        int(size),
        11,
        TreeShape(max_children=3, extra_parents=0, cpus=(1, 4), tasks=(0, 0)),
        settings=Settings(wave_timeout_s=30.0, rebalance_interval_s=0),
    )


class Side:
    """One cluster (tracing off or on) and what was measured on it."""

    def __init__(self, tracing: bool) -> None:
        self.tracing = tracing
        self.times: dict[str, list[float]] = {"echo": [], "finn": []}
        self.ready: list[float] = []
        self.msgs: dict[str, int] = {}
        self.partial = 0
        self.incomplete_traces = 0

    def wave(self, api: Api, kind: str) -> None:
        """One wave; with tracing on, its trace is then fetched (so the next wave does
        not compete with its gathering) and the fetch's time is how long after the wave
        the trace is ready."""
        if kind == "echo":
            _, wave = api.call("GET", "/api/tree")
        else:
            _, wave = api.call("POST", "/api/finn", {"tasks_per_node": 0})
        if not wave["complete"]:
            self.partial += 1
            return
        self.times[kind].append(float(wave["duration_s"]))
        self.msgs[kind] = wave["messages"]
        if self.tracing:
            elapsed, trace = api.call("GET", f"/api/waves/{wave['wave_id']}")
            self.ready.append(elapsed)
            self.incomplete_traces += 0 if trace["complete"] else 1

    def report(self) -> dict[str, Any]:
        return {
            "echo": stats(self.times["echo"]) if self.times["echo"] else None,
            "finn": stats(self.times["finn"]) if self.times["finn"] else None,
            "messages": self.msgs,
            "partial_waves": self.partial,
            "trace_ready": stats(self.ready) if self.ready else None,
            "incomplete_traces": self.incomplete_traces,
        }


def start(
    topo_file: Path, servers: int, tracing: bool, avoid: range | None
) -> tuple[RunProcess, range]:
    """A ready cluster and its servers' ports (clear of `avoid`)."""
    base = next(
        b
        for b in range(20000, 40000, 150)
        if (avoid is None or b >= avoid.stop or b + servers <= avoid.start)
        and all(port_free(p) for p in range(b, b + servers))
    )
    # `treewave run` hands its environment to every child: tracing is switched off there.
    cluster = start_run(
        Path(tempfile.mkdtemp(prefix="treewave-bench-")),
        "--log-level",
        "WARNING",
        "--ready-timeout",
        "600",
        base_port=base,
        topology=json.loads(topo_file.read_text(encoding="utf-8")),
        env=clean_env(**({} if tracing else OFF_ENV)),
    )
    cluster.wait_ready(660)
    return cluster, range(base, base + servers)


def cpu_per_wave(
    clusters: list[RunProcess], apis: list[Api], runs: int, topo: Topology
) -> dict[str, dict[str, float]]:
    """CPU ms per wave of each kind on each cluster (off, on): `runs` back-to-back waves."""
    cpu = [
        Cluster(topo, c.balancer_url, pids={n: pid for n, (_, pid) in c.servers.items()})
        for c in clusters
    ]
    out: dict[str, dict[str, float]] = {"off": {}, "on": {}}
    for kind in ("echo", "finn"):
        before = [sum(c.cpu_seconds()) for c in cpu]
        for i in range(runs):
            for j in (0, 1) if i % 2 == 0 else (1, 0):
                if kind == "echo":
                    apis[j].call("GET", "/api/tree")
                else:
                    apis[j].call("POST", "/api/finn", {"tasks_per_node": 0})
        time.sleep(1.0)  # the last traces gathered
        after = [sum(c.cpu_seconds()) for c in cpu]
        for side, b, a in zip(("off", "on"), before, after, strict=True):
            out[side][kind] = round(1000 * (a - b) / runs, 2)
    return out


def run_pair(
    topo_file: Path, servers: int, runs: int, cpu_runs: int, topo: Topology
) -> dict[str, Any]:
    """Both clusters up at once, waves alternating between them (off, on, on, off, ...),
    so both see the same machine: on a shared machine the load moves by the minute."""
    clusters: list[RunProcess] = []
    apis: list[Api] = []
    try:
        off, used = start(topo_file, servers, False, None)
        clusters.append(off)
        on, _ = start(topo_file, servers, True, used)
        clusters.append(on)
        apis = [Api(off.balancer_port), Api(on.balancer_port)]
        sides = [Side(False), Side(True)]
        for _ in range(WARMUP):
            for api in apis:
                api.call("GET", "/api/tree")
                api.call("POST", "/api/finn", {"tasks_per_node": 0})
        for i in range(runs):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for kind in ("echo", "finn"):
                for j in order:
                    sides[j].wave(apis[j], kind)
        result: dict[str, Any] = {"off": sides[0].report(), "on": sides[1].report()}
        if cpu_runs:
            result["cpu_ms_per_wave"] = cpu_per_wave(clusters, apis, cpu_runs, topo)
        result["on"]["history_kept"] = len(apis[1].call("GET", "/api/waves")[1]["waves"])
        result["off"]["history_kept"] = len(apis[0].call("GET", "/api/waves")[1]["waves"])
    finally:
        for api in apis:
            api.close()
        codes = [c.stop(signal.SIGINT) for c in clusters]
        for c in clusters:
            c.kill_everything()
    result["run_exit_codes"] = codes
    return result


# --- memory at the bound ------------------------------------------------------------------------


def simulated_traces(topo: Topology) -> tuple[dict[str, Any], dict[str, Any], SimNetwork]:
    net = SimNetwork(topo, trace=True)
    rng = random.Random(1)
    net.start_echo("echo-1")
    net.run(rng)
    net.start_finn("finn-1", FinnWork())
    net.run(rng)
    return net.trace("echo-1"), net.trace("finn-1"), net


def measured(build: Any) -> tuple[int, Any]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, kept


def memory(topo: Topology) -> dict[str, Any]:
    echo, finn, net = simulated_traces(topo)
    echo_json, finn_json = json.dumps(echo), json.dumps(finn)

    def history() -> list[Any]:
        # Each stored trace is its own object graph, as at the balancer.
        return [json.loads(echo_json if i % 2 else finn_json) for i in range(HISTORY_BOUND)]

    history_bytes, _ = measured(history)
    busiest = max(
        (n for n in topo.names),
        key=lambda n: (
            len(net.recorders[n].events("echo-1")) + len(net.recorders[n].events("finn-1"))
        ),
    )
    parts = (net.recorders[busiest].events("echo-1"), net.recorders[busiest].events("finn-1"))

    def node_buffer() -> TraceRecorder:
        rec = TraceRecorder(busiest, NODE_BOUND)
        for i in range(NODE_BOUND + 5):
            buf_events = parts[i % 2]
            wave = f"w{i}"
            for e in buf_events:
                rec.record(wave, e)
        return rec

    node_bytes, rec = measured(node_buffer)
    assert len(rec.waves) == NODE_BOUND

    def worst_case() -> TraceRecorder:
        # Every wave at the per-wave event limit (Finn events: the largest kind).
        full = TraceRecorder(busiest, NODE_BOUND)
        finn_event = next(e for e in parts[1] if e.inc is not None)
        for i in range(NODE_BOUND):
            for _ in range(full.events_per_wave):
                full.record(f"w{i}", finn_event)
        return full

    worst_bytes, _ = measured(worst_case)
    return {
        "echo_trace_json_bytes": len(echo_json),
        "finn_trace_json_bytes": len(finn_json),
        "echo_events": len(echo["events"]),
        "finn_events": len(finn["events"]),
        "history_bound": HISTORY_BOUND,
        "history_bytes_at_bound": history_bytes,
        "busiest_server": busiest,
        "busiest_server_events_per_wave": [len(parts[0]), len(parts[1])],
        "server_buffer_bound_waves": NODE_BOUND,
        "server_buffer_bytes_at_bound": node_bytes,
        "server_events_per_wave_limit": DEFAULT_EVENTS_PER_WAVE,
        "server_buffer_worst_case_bytes": worst_bytes,
        "balancer_lane": BALANCER,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="waves of each kind (200)")
    parser.add_argument("--runs-100", type=int, default=60, help="at 100 servers (60)")
    parser.add_argument("--sizes", nargs="+", default=["default", "100"])
    parser.add_argument(
        "--cpu-runs", type=int, default=30, help="back-to-back waves of each kind for CPU (30)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only measure the memory at the bounds (into the sizes already in --out)",
    )
    args = parser.parse_args(argv)
    if args.memory_only:
        data = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
        for size in args.sizes:
            kept = data.setdefault("sizes", {}).setdefault(size, {})
            kept["memory"] = memory(topology_for(size))
            kept["memory"]["commit"] = git_commit()
            print(size, json.dumps(kept["memory"]))
        args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return 0

    # Sizes measured in earlier runs are kept (run one size at a time on a busy machine).
    earlier = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
    report: dict[str, Any] = {
        "benchmark": "trace_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "sizes": dict(earlier.get("sizes", {})),
    }
    with tempfile.TemporaryDirectory(prefix="trace-bench-") as tmp:
        for size in args.sizes:
            topo = topology_for(size)
            topo_file = Path(tmp) / f"topology-{size}.json"
            topo_file.write_text(topo.dumps(), encoding="utf-8")
            runs = args.runs if size == "default" else args.runs_100
            entry: dict[str, Any] = {"servers": len(topo), "runs": runs}
            entry["load_before"] = [round(x, 2) for x in os.getloadavg()]
            entry.update(run_pair(topo_file, len(topo), runs, args.cpu_runs, topo))
            entry["load_after"] = [round(x, 2) for x in os.getloadavg()]
            entry["memory"] = memory(topo)
            entry["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            report["sizes"][size] = entry
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(
        f"{'topology':<10}{'wave':<6}{'msgs':>6}{'off median':>12}{'p95':>9}"
        f"{'on median':>12}{'p95':>9}{'on/off':>8}"
    )
    for size, e in report["sizes"].items():
        for kind in ("echo", "finn"):
            off, on = e["off"][kind], e["on"][kind]
            print(
                f"{size:<10}{kind:<6}{e['on']['messages'].get(kind, '?')!s:>6}"
                f"{off['median_ms']:>9.2f} ms{off['p95_ms']:>6.2f} ms"
                f"{on['median_ms']:>9.2f} ms{on['p95_ms']:>6.2f} ms"
                f"{on['median_ms'] / off['median_ms']:>8.2f}"
            )
        cpu = e.get("cpu_ms_per_wave")
        if cpu:
            for kind in ("echo", "finn"):
                off_ms, on_ms = cpu["off"][kind], cpu["on"][kind]
                print(
                    f"{size}: CPU per back-to-back {kind} wave: off {off_ms:.1f} ms, "
                    f"on {on_ms:.1f} ms, on/off {on_ms / off_ms:.2f}"
                )
        ready = e["on"]["trace_ready"]
        m = e["memory"]
        print(
            f"{size}: trace ready {ready['median_ms']:.1f} ms (p95 {ready['p95_ms']:.1f}) after "
            f"the wave; history at its bound ({m['history_bound']} traces) "
            f"{m['history_bytes_at_bound'] / 2**20:.2f} MiB; a server's buffer at its bound "
            f"({m['server_buffer_bound_waves']} waves, {m['busiest_server']}) "
            f"{m['server_buffer_bytes_at_bound'] / 2**20:.2f} MiB; load "
            f"{e['load_before']} -> {e['load_after']}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
