"""`treewave simulate`: one Echo and one Finn wave through the in-memory network."""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path
from typing import Any

from treewave.cli.argtypes import positive_int
from treewave.cli.errors import CommandError
from treewave.core.messages import FinnWork
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER

__all__ = ["register", "simulate"]

MAX_TRACED_NODES = 2000
"""`--trace` keeps a vector clock per event, which grows with the servers a wave has
reached: some N^2 numbers in all, so traces are for networks people can look at."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="run Echo and Finn on a simulated network of N servers",
        description="Generate a random topology of N servers and run one Echo and one Finn "
        "wave through an in-memory network that delivers in-flight messages in a random "
        "(seeded) order, using the same state machines as the real services.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  treewave simulate --nodes 10000 --seed 7 --json",
    )
    p.add_argument("--nodes", type=positive_int, required=True, help="number of servers")
    p.add_argument("--seed", type=int, default=0, help="seed for topology and delivery order")
    p.add_argument("--max-children", type=positive_int, default=3, help="default: 3")
    p.add_argument(
        "--extra-parents",
        type=int,
        default=None,
        help="extra parent edges (default: 5%% of the servers)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        default=None,
        help=f"write both waves' traces to FILE, in the format of the balancer's "
        f"/api/waves/{{id}} (at most {MAX_TRACED_NODES} servers); read it with "
        "`treewave trace WAVE_ID --file FILE`",
    )
    p.set_defaults(handler=run)


def simulate(
    nodes: int,
    seed: int,
    max_children: int = 3,
    extra: int | None = None,
    trace_to: Path | None = None,
) -> dict[str, Any]:
    if trace_to is not None and nodes > MAX_TRACED_NODES:
        raise CommandError(f"--trace is for at most {MAX_TRACED_NODES} servers, not {nodes}")
    extra_parents = nodes // 20 if extra is None else extra
    # The run allocates millions of long-lived objects and frees almost none: the cyclic
    # garbage collector would only rescan them (some 40% of the time at 50k servers).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        topology = random_topology(nodes, seed, TreeShape(max_children, extra_parents))
        # Untraced, a server's part in the Finn wave is released once nothing more can
        # reach it (a traced run keeps it: the recorder reads the sets' sizes).
        net = SimNetwork(topology, trace=trace_to is not None, release=trace_to is None)
        rng = random.Random(seed)
        t0 = time.perf_counter()
        net.start_echo("echo-1")
        net.run_quiet(rng)
        t1 = time.perf_counter()
        net.start_finn("finn-1", FinnWork(tasks_per_node=1))
        net.run_quiet(rng)
        t2 = time.perf_counter()
        echo, finn = net.logs["echo-1"], net.logs["finn-1"]
        decisions = [s.decisions.count("finn-1") for s in net.servers.values()]
        if trace_to is not None:
            traces = {"waves": [net.trace("echo-1"), net.trace("finn-1")]}
            try:
                trace_to.write_text(json.dumps(traces, separators=(",", ":")), encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"cannot write the trace file {trace_to}: {exc}") from None
        report = {
            "nodes": nodes,
            "edges": topology.echo_edge_count,
            "echo": {
                "messages": echo.messages,
                "participants": len(echo.participants),
                "decided": echo.result is not None and echo.result.complete,
                "seconds": round(t1 - t0, 3),
            },
            "finn": {
                "messages": finn.messages,
                "directed_edges": topology.finn_edge_count,
                "decided_nodes": sum(1 for d in decisions if d),
                "decided_once": all(d == 1 for d in decisions),
                "decided": finn.result is not None and finn.result.complete,
                "balancer_last": bool(finn.decide_order) and finn.decide_order[-1] == BALANCER,
                "seconds": round(t2 - t1, 3),
            },
        }
        # Freed while the collector is still off: switched on first, it would scan every
        # object of the network again on the next allocations (tens of seconds at 1M).
        del net, topology, echo, finn, decisions
    finally:
        if gc_was_enabled:
            gc.enable()
    return report


def run(args: argparse.Namespace) -> int:
    report = simulate(args.nodes, args.seed, args.max_children, args.extra_parents, args.trace)
    if args.json:
        print(json.dumps(report))
    else:
        e, f = report["echo"], report["finn"]
        print(f"{report['nodes']} servers, {report['edges']} links (balancer's included)")
        print(
            f"echo: {e['messages']} messages (2|E| = {2 * report['edges']}), "
            f"{e['participants']} servers took part, decided: {e['decided']} ({e['seconds']} s)"
        )
        print(
            f"finn: {f['messages']} messages over {f['directed_edges']} directed edges, "
            f"{f['decided_nodes']} servers decided, each exactly once: {f['decided_once']}, "
            f"balancer last: {f['balancer_last']}, decided: {f['decided']} ({f['seconds']} s)"
        )
    ok = report["echo"]["decided"] and report["finn"]["decided"] and report["finn"]["decided_once"]
    return 0 if ok else 1
