"""What a wave costs as the tree grows: Echo and Finn on real services, and the simulator.

    python -m bench.waves_scale                   # real: 10, 30, 100 servers; sim: 1k, 10k, 100k
    python -m bench.waves_scale --real 10 30 --sim 1000 --samples 20
    python -m bench.waves_scale --no-sim          # only the real services

Real services: for each size and shape (`balanced`: random tree, max 3 children; `chain`:
max 1 child) the whole cluster is started with `treewave run` (local processes, periodic
rebalancing off), then Echo (`GET /api/tree`) and Finn (`POST /api/finn`, zero tasks) are
run `--samples` times each, one after the other. Wave time is the balancer-reported
`duration_s`. Its floor is 2 x depth x the one-hop WebSocket round trip, measured here on
the same machine with a bare aiohttp echo server (another process) and client; depth counts
the balancer's link to the root. Echo must send exactly 2|E| messages. CPU per wave: the
CPU time (user + system, /proc) of the balancer and every server over the samples, per
wave and per wave message (everything the cluster does, traces of the waves included).

Simulator: one subprocess per size runs `treewave simulate`'s function (one Echo, one Finn
through the in-memory network) and reports wall time and peak RSS of that process.

Prints a table and writes bench/results/waves_scale.json. The machine may be shared: all
figures of one run are taken side by side, so compare ratios rather than absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.http import get_json
from tests.support.ports import free_port
from tests.support.run import start_run
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.topology import Settings, Topology

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "waves_scale.json"
SEED = 11


# --- HTTP -------------------------------------------------------------------------------------


# --- a cluster as local processes ---------------------------------------------------------------


@dataclass
class Cluster:
    """A running `treewave run`: the balancer's URL and the servers' state URLs."""

    topology: Topology
    url: str
    node_urls: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    """The balancer's and every server's process, by name."""

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) used so far by (the balancer, all the servers)."""
        ticks = os.sysconf("SC_CLK_TCK")
        balancer = servers = 0
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                used = int(fields[11]) + int(fields[12])
                if name == "balancer":
                    balancer += used
                else:
                    servers += used
        return balancer / ticks, servers / ticks

    def tree(self) -> dict[str, Any]:
        return get_json(self.url + "/api/tree")  # type: ignore[no-any-return]

    def finn(self, tasks_per_node: int = 0, duration_s: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"tasks_per_node": tasks_per_node}
        if duration_s is not None:
            body["duration_s"] = duration_s
        return get_json(self.url + "/api/finn", "POST", body)  # type: ignore[no-any-return]

    def submit(
        self, node: str, count: int, duration_s: float, actual_s: float | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"node": node, "count": count, "duration_s": duration_s}
        if actual_s is not None:
            body["actual_s"] = actual_s  # emulation: the declaration is wrong
        return get_json(self.url + "/api/tasks", "POST", body)  # type: ignore[no-any-return]

    def states(self) -> dict[str, dict[str, Any]]:
        return {n: get_json(u + "/api/state", timeout=10.0) for n, u in self.node_urls.items()}


@contextlib.contextmanager
def cluster(
    topology: Topology,
    rebalance_interval: float = 0.0,
    ready_timeout: float = 600.0,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """Start `treewave run` on `topology`; always stops it and everything it started."""
    run_dir = Path(tempfile.mkdtemp(prefix="treewave-bench-"))
    extra = ["--rebalance-interval", str(rebalance_interval), "--log-level", "WARNING"]
    extra += ["--ready-timeout", str(ready_timeout), *extra_args]
    run = start_run(
        run_dir, *extra, topology=topology.to_json_data(), env={**os.environ, **(env or {})}
    )
    try:
        run.wait_ready(ready_timeout + 10)
        c = Cluster(topology, run.balancer_url)
        c.node_urls = {
            name: f"http://127.0.0.1:{port}"
            for name, (port, _) in run.servers.items()
            if name in topology
        }
        c.pids = {name: pid for name, (_, pid) in run.servers.items()}
        if len(c.node_urls) != len(topology):
            raise RuntimeError(f"could not read every server URL from:\n{run.output[-2000:]}")
        yield c
    finally:
        run.kill_everything()
        shutil.rmtree(run_dir, ignore_errors=True)


def bench_topology(
    nodes: int, shape: str, seed: int = SEED, cpus: tuple[int, int] = (1, 4)
) -> Topology:
    """A tree (no extra parents, no initial tasks): `balanced` (<= 3 children) or `chain`."""
    max_children = 1 if shape == "chain" else 3
    return random_topology(
        nodes,
        seed,
        TreeShape(max_children=max_children, extra_parents=0, cpus=cpus, tasks=(0, 0)),
        settings=Settings(wave_timeout_s=30.0, rebalance_interval_s=0),
    )


# --- one-hop WebSocket round trip ------------------------------------------------------------

_ECHO_SERVER = textwrap.dedent(
    """
    import sys
    from aiohttp import web

    async def ws(request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(msg.data)
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
    """
)


def measure_rtt(samples: int = 2000) -> dict[str, float]:
    """Median (and p95) round trip of a small text frame over one aiohttp WebSocket to a
    bare echo server in another process: the cheapest possible hop on this machine."""
    import asyncio

    import aiohttp

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, str(port)])
    # a frame the size of an Echo explore message
    frame = json.dumps(
        {"type": "echo.explore", "wave": "echo-abc123-42", "sender": "s042", "budget_s": 30.0}
    )

    async def run() -> list[float]:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws")
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError("echo server did not start")
            times = []
            for i in range(samples + 200):
                t0 = time.perf_counter()
                await ws.send_str(frame)
                await ws.receive()
                if i >= 200:  # warm-up
                    times.append(time.perf_counter() - t0)
            await ws.close()
            return times

    try:
        times = asyncio.run(run())
    finally:
        server.terminate()
        server.wait()
    times.sort()
    return {
        "median_s": statistics.median(times),
        "p95_s": times[int(0.95 * len(times))],
        "samples": len(times),
    }


# --- real services ----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def bench_real(nodes: int, shape: str, samples: int, rtt: float) -> dict[str, Any]:
    topo = bench_topology(nodes, shape)
    hops = topo.depth + 1  # the balancer -> root link counts
    floor = 2 * hops * rtt
    t0 = time.monotonic()
    with cluster(topo) as c:
        up_s = time.monotonic() - t0
        c.tree()  # warm the links
        cpu0 = c.cpu_seconds()
        echo = [c.tree() for _ in range(samples)]
        cpu1 = c.cpu_seconds()
        finn = [c.finn(tasks_per_node=0) for _ in range(samples)]
        cpu2 = c.cpu_seconds()
    out: dict[str, Any] = {
        "nodes": nodes,
        "shape": shape,
        "depth_hops": hops,
        "echo_edges": topo.echo_edge_count,
        "finn_directed_edges": topo.finn_edge_count,
        "startup_s": round(up_s, 2),
        "floor_s": floor,
        "loadavg_1min": os.getloadavg()[0],
    }
    for name, waves, before, after in (("echo", echo, cpu0, cpu1), ("finn", finn, cpu1, cpu2)):
        times = [w["duration_s"] for w in waves]
        msgs = sorted({w["messages"] for w in waves})
        balancer_cpu, servers_cpu = (a - b for a, b in zip(after, before, strict=True))
        cpu = balancer_cpu + servers_cpu
        out[name] = {
            "cpu_ms_per_wave": round(1000 * cpu / len(waves), 2),
            "balancer_cpu_ms_per_wave": round(1000 * balancer_cpu / len(waves), 2),
            "cpu_us_per_message": round(1e6 * cpu / sum(w["messages"] for w in waves), 1),
            "median_s": statistics.median(times),
            "p95_s": pct(times, 0.95),
            "messages": msgs,
            "complete": all(w["complete"] for w in waves),
            "floor_ratio_median": statistics.median(times) / floor,
            "floor_ratio_p95": pct(times, 0.95) / floor,
        }
    out["echo"]["messages_ok"] = out["echo"]["messages"] == [2 * topo.echo_edge_count]
    return out


# --- simulator --------------------------------------------------------------------------------

_SIM = textwrap.dedent(
    """
    import json, resource, sys, time
    from treewave.cli.simulate_cmd import simulate
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    report = simulate(int(sys.argv[1]), int(sys.argv[2]))
    report["wall_s"] = round(time.perf_counter() - t0, 3)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["baseline_rss_mib"] = round(base / 1024, 1)
    print(json.dumps(report))
    """
)


def bench_sim(nodes: int, seed: int = SEED) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _SIM, str(nodes), str(seed)],
        capture_output=True,
        text=True,
        check=True,
    )
    r: dict[str, Any] = json.loads(done.stdout)
    r["echo"]["messages_ok"] = r["echo"]["messages"] == 2 * r["edges"]
    r["finn"]["messages_per_directed_edge"] = round(
        r["finn"]["messages"] / r["finn"]["directed_edges"], 3
    )
    return r


# --- main -------------------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--real", type=int, nargs="*", default=[10, 30, 100])
    ap.add_argument("--shapes", nargs="*", default=["balanced", "chain"])
    ap.add_argument("--sim", type=int, nargs="*", default=[1000, 10000, 100000])
    ap.add_argument("--no-sim", action="store_true")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "command": "python -m bench.waves_scale " + " ".join(sys.argv[1:]),
    }
    rtt = measure_rtt()
    report["ws_rtt"] = rtt
    print(
        f"one-hop WebSocket round trip: median {1e6 * rtt['median_s']:.0f} us, "
        f"p95 {1e6 * rtt['p95_s']:.0f} us ({rtt['samples']} samples)",
        flush=True,
    )

    real = []
    for n in args.real:
        for shape in args.shapes:
            try:
                r = bench_real(n, shape, args.samples, rtt["median_s"])
            except Exception as exc:  # record and go on: one size must not sink the rest
                print(f"  {n:>4} {shape:<8} FAILED: {str(exc)[-300:]}", flush=True)
                real.append({"nodes": n, "shape": shape, "error": str(exc)[-2000:]})
                continue
            real.append(r)
            e, f = r["echo"], r["finn"]
            print(
                f"  {n:>4} {shape:<8} depth {r['depth_hops']:>3}: echo {ms(e['median_s'])} ms "
                f"(x{e['floor_ratio_median']:.2f} floor), finn {ms(f['median_s'])} ms; CPU "
                f"per wave echo {e['cpu_ms_per_wave']} ms (balancer "
                f"{e['balancer_cpu_ms_per_wave']}; {e['cpu_us_per_message']} us per message), "
                f"finn {f['cpu_ms_per_wave']} ms ({f['cpu_us_per_message']} us)",
                flush=True,
            )
    report["real"] = real
    report["loadavg_after_real"] = os.getloadavg()

    sims = []
    if not args.no_sim:
        for n in args.sim:
            r = bench_sim(n)
            sims.append(r)
            print(f"  sim {n}: {r['wall_s']} s, {r['peak_rss_mib']} MiB", flush=True)
    report["sim"] = sims

    print()
    print("Real services (treewave run, local processes); wave time = balancer's duration_s")
    hdr = (
        f"{'servers':>7} {'shape':<8} {'hops':>4} {'floor ms':>8} | {'echo med':>8} {'p95':>7} "
        f"{'x floor':>7} {'msgs':>5} {'=2|E|':>5} | {'finn med':>8} {'p95':>7} {'x floor':>7} "
        f"{'msgs':>5} {'|E|dir':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in real:
        if "error" in r:
            print(f"{r['nodes']:>7} {r['shape']:<8} failed to start (see the JSON)")
            continue
        e, f = r["echo"], r["finn"]
        print(
            f"{r['nodes']:>7} {r['shape']:<8} {r['depth_hops']:>4} {ms(r['floor_s']):>8} | "
            f"{ms(e['median_s']):>8} {ms(e['p95_s']):>7} {e['floor_ratio_median']:>7.2f} "
            f"{'/'.join(map(str, e['messages'])):>5} {e['messages_ok']!s:>5} | "
            f"{ms(f['median_s']):>8} {ms(f['p95_s']):>7} {f['floor_ratio_median']:>7.2f} "
            f"{'/'.join(map(str, f['messages'])):>5} {r['finn_directed_edges']:>6}"
        )
    print(f"floor = 2 x hops x one-hop WebSocket RTT ({1e6 * rtt['median_s']:.0f} us median)")
    if sims:
        print()
        print("Simulator (one Echo + one Finn, in-memory network, one process per size)")
        hdr = (
            f"{'servers':>8} {'|E|':>8} {'echo msgs':>9} {'=2|E|':>5} {'echo s':>7} | "
            f"{'finn msgs':>9} {'dir edges':>9} {'ratio':>5} {'finn s':>7} | "
            f"{'peak MiB':>8}"
        )
        print(hdr)
        print("-" * len(hdr))
        for r in sims:
            e, f = r["echo"], r["finn"]
            print(
                f"{r['nodes']:>8} {r['edges']:>8} {e['messages']:>9} {e['messages_ok']!s:>5} "
                f"{e['seconds']:>7} | {f['messages']:>9} {f['directed_edges']:>9} "
                f"{f['messages_per_directed_edge']:>5} {f['seconds']:>7} | {r['peak_rss_mib']:>8}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    ok = all(
        "error" not in r and r["echo"]["messages_ok"] and r["echo"]["complete"] for r in real
    ) and all(r["echo"]["messages_ok"] for r in sims)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
