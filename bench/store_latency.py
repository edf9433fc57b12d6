"""What persisting a server's tasks costs, on real processes with a state directory.

    python -m bench.store_latency [--queue 100000] [--posts 40] [--transfers 200] [--waves 30]

Three figures (each server keeps its tasks in its state directory, as under Compose):

1. `submit`: median time of `POST /api/tasks` with `count=1` (answered once the server has
   the task on disk) to a server holding 0 queued tasks, and to one holding QUEUE.
2. `transfers`: single-task transfers per second between two servers holding QUEUE queued
   tasks each, driven step by step (prepare, deliver, commit: each step is stored before
   it is answered) by this script in the balancer's place.
3. `echo`: the median Echo wave (`GET /api/tree`, as the balancer reports it) on the
   default tree (topology.json), idle and while one server holding QUEUE tasks takes a
   stream of one-task submissions.

Tasks are declared an hour long, so nothing runs meanwhile. The same script measures any
release (it only uses the HTTP API and the link protocol), so "before" and "after" are
the same commands. Prints one JSON line per figure with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.cluster import BALANCER, Cluster, ClusterPool
from tests.support.commands import REPO
from tests.support.http import get_json

HOUR = 3600.0


def two_servers() -> dict[str, Any]:
    return {
        "settings": {"task_time_s": HOUR, "rebalance_interval_s": 0, "wave_timeout_s": 10},
        "servers": [
            {"name": "root", "cpus": 1, "tasks": 0, "children": ["a", "b"]},
            {"name": "a", "cpus": 1, "tasks": 0, "children": []},
            {"name": "b", "cpus": 1, "tasks": 0, "children": []},
        ],
    }


def post(cluster: Cluster, node: str, count: int) -> float:
    started = time.perf_counter()
    get_json(
        cluster.balancer_url + "/api/tasks",
        "POST",
        {"node": node, "count": count, "duration_s": HOUR},
        timeout=600,
    )
    return time.perf_counter() - started


PRELOAD_CHUNK = 10_000
"""Tasks per preloading submission (one of 100,000 can outlast the balancer's wait for
the server's confirmation on a loaded machine)."""


def preload(cluster: Cluster, node: str, queue: int) -> None:
    for start in range(0, queue, PRELOAD_CHUNK):
        post(cluster, node, min(PRELOAD_CHUNK, queue - start))


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def submit_figure(pool: ClusterPool, queue: int, posts: int) -> dict[str, Any]:
    cluster = pool.start(two_servers(), state_dir=True, tied=True)
    post(cluster, "a", 1)  # warm-up, both
    post(cluster, "b", 1)
    empty = [post(cluster, "b", 1) for _ in range(posts)]
    preload(cluster, "a", queue)
    full = [post(cluster, "a", 1) for _ in range(posts)]
    return {
        "figure": "submit",
        "queue": queue,
        "median_ms_empty": median_ms(empty),
        "median_ms_full": median_ms(full),
        "ratio": round(statistics.median(full) / statistics.median(empty), 2),
        "load": load(),
    }


async def drive_transfers(cluster: Cluster, transfers: int) -> float:
    """Single-task transfers a -> b and back, as the coordinator runs them; per second."""
    async with aiohttp.ClientSession() as session:
        links = {}
        for name in ("a", "b"):
            ws = await session.ws_connect(cluster.ws_url(name), max_msg_size=0)
            await ws.send_str(json.dumps({"type": "hello", "sender": BALANCER, "token": ""}))
            links[name] = ws

        async def ask(name: str, frame: dict[str, Any], answer: str) -> dict[str, Any]:
            await links[name].send_str(json.dumps(frame))
            while True:
                reply: dict[str, Any] = json.loads((await links[name].receive()).data)
                if reply["type"] == answer:
                    return reply

        started = time.perf_counter()
        for i in range(transfers):
            donor, recipient = ("a", "b") if i % 2 == 0 else ("b", "a")
            tid = f"bench-{i}"
            prepared = await ask(
                donor,
                {"type": "transfer.prepare", "transfer": tid, "target": recipient, "count": 1},
                "transfer.prepared",
            )
            assert len(prepared["tasks"]) == 1, prepared
            deliver = {"type": "transfer.deliver", "transfer": tid, "source": donor}
            outcome = await ask(
                recipient, {**deliver, "tasks": prepared["tasks"]}, "transfer.outcome"
            )
            assert outcome["outcome"] == "accepted", outcome
            await ask(donor, {"type": "transfer.commit", "transfer": tid}, "transfer.settled")
        elapsed = time.perf_counter() - started
        for ws in links.values():
            await ws.close()
    return transfers / elapsed


def transfer_figure(pool: ClusterPool, queue: int, transfers: int) -> dict[str, Any]:
    cluster = pool.start(two_servers(), state_dir=True, tied=True)
    preload(cluster, "a", queue)
    preload(cluster, "b", queue)
    cluster.services[BALANCER].stop()  # this script coordinates now
    rate = asyncio.run(drive_transfers(cluster, transfers))
    return {
        "figure": "transfers",
        "queue_each": queue,
        "transfers": transfers,
        "per_s": round(rate, 1),
        "load": load(),
    }


def echo_ms(cluster: Cluster, waves: int) -> list[float]:
    out = []
    for _ in range(waves):
        tree = get_json(cluster.balancer_url + "/api/tree", timeout=60)
        if tree.get("complete"):
            out.append(float(tree["duration_s"]))
    return out


def echo_figure(pool: ClusterPool, queue: int, waves: int) -> dict[str, Any]:
    topology = json.loads((REPO / "topology.json").read_text(encoding="utf-8"))
    topology["settings"] = {**topology.get("settings", {}), "rebalance_interval_s": 0}
    cluster = pool.start(topology, state_dir=True, tied=True)
    target = cluster.leaves[0]
    echo_ms(cluster, 5)  # warm-up
    idle = echo_ms(cluster, waves)
    preload(cluster, target, queue)
    stop = threading.Event()
    streamed = 0

    def stream() -> None:
        nonlocal streamed
        while not stop.is_set():
            post(cluster, target, 1)
            streamed += 1

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    time.sleep(1.0)
    started = time.perf_counter()
    busy = echo_ms(cluster, waves)
    rate = streamed / (time.perf_counter() - started + 1.0)
    stop.set()
    thread.join()
    return {
        "figure": "echo",
        "servers": len(topology["servers"]),
        "queue_at_target": queue,
        "median_ms_idle": median_ms(idle),
        "median_ms_streaming": median_ms(busy),
        "complete_waves": f"{len(busy)}/{waves}",
        "submissions_per_s": round(rate, 1),
        "load": load(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, default=100_000, help="queued tasks (100000)")
    parser.add_argument("--posts", type=int, default=40, help="submissions timed (40)")
    parser.add_argument("--transfers", type=int, default=200, help="transfers timed (200)")
    parser.add_argument("--waves", type=int, default=30, help="Echo waves timed (30)")
    parser.add_argument(
        "--only", choices=("submit", "transfers", "echo"), action="append", help="one figure"
    )
    args = parser.parse_args()
    figures = args.only or ["submit", "transfers", "echo"]
    with tempfile.TemporaryDirectory(prefix="store-latency-") as tmp:
        pool = ClusterPool(Path(tmp))
        try:
            for figure in figures:
                if figure == "submit":
                    result = submit_figure(pool, args.queue, args.posts)
                elif figure == "transfers":
                    result = transfer_figure(pool, args.queue, args.transfers)
                else:
                    result = echo_figure(pool, args.queue, args.waves)
                print(json.dumps(result), flush=True)
                for cluster in pool.clusters:
                    cluster.stop_all()
                pool.clusters.clear()
        finally:
            pool.close(print_logs=False)


if __name__ == "__main__":
    main()
