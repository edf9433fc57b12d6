"""The `local` runner: a real `treewave run` cluster (every server and the balancer as
processes on loopback), fed a workload through the balancer's HTTP API.

The policy is chosen the way a user chooses it: `settings.policy` in the topology file
the cluster runs. While the workload runs, every server's `/api/state` is polled (every
`POLL_S`): the busy timeline, the imbalance and the mean wait (by Little's law: the time
integral of the queue length over the number of tasks) come from those polls, the tasks
moved from the servers' `transferred_in`, the wave latencies from the balancer's
`treewave_wave_duration_seconds` histogram. The makespan runs from the first submission
to the first poll that finds every task done.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treewave.core.topology import Topology
from treewave.experiment.results import RunResult, imbalance_of, time_mean
from treewave.experiment.workloads import Workload

__all__ = ["LocalCluster", "local_cluster", "run_workload"]

HOST = "127.0.0.1"
POLL_S = 0.02
READY_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
SERVER_LINE = re.compile(r"^\s+(?P<name>\S+)\s+http://127\.0\.0\.1:(?P<port>\d+)\s+pid \d+$")
WAVE_BUCKET = re.compile(r'^treewave_wave_duration_seconds_bucket\{.*le="([^"]+)"\}\s+(\S+)$')
WAVE_TOTAL = re.compile(r"^treewave_wave_duration_seconds_(sum|count)\{.*\}\s+(\S+)$")


class LocalRunError(RuntimeError):
    pass


def _http(url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read().decode()
    return json.loads(raw) if raw.lstrip().startswith(("{", "[")) else raw


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _free_block(size: int) -> int:
    for _ in range(200):
        base = random.randint(30000, 40000 - size)
        if all(_port_free(p) for p in range(base, base + size)):
            return base
    raise LocalRunError(f"no {size} consecutive free ports between 30000 and 40000")


@dataclass
class LocalCluster:
    """A running `treewave run`: the balancer's URL and every server's URL."""

    topology: Topology
    url: str
    proc: subprocess.Popen[str]
    node_urls: dict[str, str] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        return _http(self.url + "/api/status")  # type: ignore[no-any-return]

    def wave_metrics(self) -> tuple[dict[float, float], float, float]:
        """The wave-duration histogram (cumulative buckets, all algorithms), its sum and
        its count."""
        text = _http(self.url + "/metrics")
        buckets: dict[float, float] = {}
        totals = {"sum": 0.0, "count": 0.0}
        for line in str(text).splitlines():
            if m := WAVE_BUCKET.match(line):
                buckets[float(m[1])] = buckets.get(float(m[1]), 0.0) + float(m[2])
            elif m := WAVE_TOTAL.match(line):
                totals[m[1]] += float(m[2])
        return buckets, totals["sum"], totals["count"]


@contextlib.contextmanager
def local_cluster(topology: Topology, log: Path | None = None) -> Iterator[LocalCluster]:
    """Start `treewave run` on `topology` (its settings choose the policy and interval);
    always stops it (SIGINT, then SIGKILL) and waits for it."""
    with tempfile.TemporaryDirectory(prefix="treewave-experiment-") as tmp:
        path = Path(tmp) / "topology.json"
        path.write_text(topology.dumps(), encoding="utf-8")
        port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "treewave.cli.main",
            "run",
            "--topology",
            str(path),
            "--port",
            str(port),
            "--base-port",
            str(_free_block(len(topology) + 2)),
            "--log-level",
            "WARNING",
            "--rebalance-interval",
            str(topology.settings.rebalance_interval_s),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TREEWAVE_")}
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        cluster = LocalCluster(topology, f"http://{HOST}:{port}", proc)
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                cluster.output.append(line.rstrip("\n"))
                m = SERVER_LINE.match(line.rstrip("\n"))
                if m and m["name"] in topology:
                    cluster.node_urls[m["name"]] = f"http://{HOST}:{m['port']}"
                if line.startswith("try: treewave status"):
                    ready.set()
            ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if not ready.wait(READY_TIMEOUT_S) or len(cluster.node_urls) != len(topology):
                tail = "\n".join(cluster.output[-20:])
                raise LocalRunError(f"`treewave run` did not come up; its output ends:\n{tail}")
            yield cluster
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            reader.join(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
            if log is not None:
                log.write_text("\n".join(cluster.output) + "\n", encoding="utf-8")


def run_workload(c: LocalCluster, w: Workload, policy: str, seed: int) -> RunResult:
    """Submit `w` at its pace and poll until every task is done."""
    names = list(c.node_urls)
    cpus = {n: c.topology.server(n).cpus for n in names}
    with ThreadPoolExecutor(max_workers=min(16, len(names) + 1)) as pool:

        def states() -> list[dict[str, Any]]:
            return list(pool.map(lambda n: _http(c.node_urls[n] + "/api/state"), names))

        before = states()
        done0 = sum(s["completed"] for s in before)
        in0 = sum(s["transferred_in"] for s in before)
        waves0, sum0, count0 = c.wave_metrics()
        busy: dict[str, list[tuple[float, int]]] = {n: [(0.0, 0)] for n in names}
        samples: list[tuple[float, float]] = []
        queued_area = 0.0
        arrivals = w.arrivals()
        t0 = time.monotonic()
        last = 0.0
        while True:
            now = time.monotonic() - t0
            while arrivals and arrivals[0][0] <= now:
                _, batches = arrivals.pop(0)
                list(pool.map(lambda b: _http(c.url + "/api/tasks", _task_body(b)), batches))
            snap = states()
            now = time.monotonic() - t0
            queued = sum(s["queued"] + s["reserved"] for s in snap)
            queued_area += queued * (now - last)
            last = now
            for n, s in zip(names, snap, strict=True):
                if busy[n][-1][1] != s["running"]:
                    busy[n].append((now, s["running"]))
            samples.append(
                (now, imbalance_of([s["expected_work_s"] for s in snap], [s["cpus"] for s in snap]))
            )
            done = sum(s["completed"] for s in snap) - done0
            idle = all(s["queued"] == 0 and s["running"] == 0 and s["reserved"] == 0 for s in snap)
            if not arrivals and done >= w.tasks and idle:
                break
            if now > RUN_TIMEOUT_S:
                raise LocalRunError(f"{w.name}: not done after {RUN_TIMEOUT_S:g} s")
            time.sleep(POLL_S)
    for n in names:
        busy[n].append((now, 0))
    waves1, sum1, count1 = c.wave_metrics()
    delta = sorted((le, waves1.get(le, 0) - waves0.get(le, 0)) for le in waves1)
    counts = [(le, int(k - (delta[i - 1][1] if i else 0))) for i, (le, k) in enumerate(delta)]
    mean = (sum1 - sum0) / (count1 - count0) if count1 > count0 else None
    return RunResult(
        policy=policy,
        seed=seed,
        runner="local",
        tasks=w.tasks,
        lower_bound_s=w.lower_bound(sum(cpus.values())),
        makespan_s=now,
        tasks_moved=sum(s["transferred_in"] for s in snap) - in0,
        mean_wait_s=queued_area / w.tasks if w.tasks else 0.0,
        imbalance_mean=time_mean(samples, now),
        imbalance=samples,
        busy=busy,
        cpus=cpus,
        wave_latency_buckets=counts,
        wave_latency_mean_s=mean,
        reported_policy=c.status().get("policy"),
    )


def _task_body(b: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"node": b.node, "count": b.count, "duration_s": b.duration_s}
    if b.actual_s is not None:
        body["actual_s"] = b.actual_s
    return body
