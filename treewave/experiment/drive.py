"""Driving a running cluster through its URLs: what the real runners (`local`, `compose`)
share once they have a cluster up.

A `Cluster` is the balancer's URL and every server's URL, however they were started. The
workload is submitted at its pace through the balancer's `POST /api/tasks`; while it runs,
every server's `/api/state` is polled (every `POLL_S`): the busy timeline, the imbalance
and the mean wait (by Little's law: the time integral of the queue length over the number
of tasks) come from those polls, the tasks moved from the servers' `transferred_in`, the
tasks completed from their `completed`, the wave latencies from the balancer's
`treewave_wave_duration_seconds` histogram. The makespan runs from the first submission
to the first poll that finds every task done.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from treewave.core.topology import Topology
from treewave.experiment.results import RunResult, imbalance_of, time_mean
from treewave.experiment.workloads import Batch, Workload

__all__ = ["Cluster", "RunError", "http_json", "run_workload", "wait_until_linked"]

POLL_S = 0.02
RUN_TIMEOUT_S = 300.0
WAVE_BUCKET = re.compile(r'^treewave_wave_duration_seconds_bucket\{.*le="([^"]+)"\}\s+(\S+)$')
WAVE_TOTAL = re.compile(r"^treewave_wave_duration_seconds_(sum|count)\{.*\}\s+(\S+)$")


class RunError(RuntimeError):
    """A real runner's cluster did not come up, did not finish, or misreported itself."""


def http_json(url: str, body: Any = None, timeout: float = 10.0) -> Any:
    """GET `url` (or POST `body` as JSON); the answer parsed when it is JSON, else text."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read().decode()
    return json.loads(raw) if raw.lstrip().startswith(("{", "[")) else raw


@dataclass
class Cluster:
    """A running cluster as the runners see it: the balancer's URL and every server's."""

    runner: ClassVar[str]
    topology: Topology
    url: str
    node_urls: dict[str, str]

    def status(self) -> dict[str, Any]:
        return http_json(self.url + "/api/status")  # type: ignore[no-any-return]

    def wave_metrics(self) -> tuple[dict[float, float], float, float]:
        """The wave-duration histogram (cumulative buckets, all algorithms), its sum and
        its count."""
        text = http_json(self.url + "/metrics")
        buckets: dict[float, float] = {}
        totals = {"sum": 0.0, "count": 0.0}
        for line in str(text).splitlines():
            if m := WAVE_BUCKET.match(line):
                buckets[float(m[1])] = buckets.get(float(m[1]), 0.0) + float(m[2])
            elif m := WAVE_TOTAL.match(line):
                totals[m[1]] += float(m[2])
        return buckets, totals["sum"], totals["count"]


def wait_until_linked(c: Cluster, timeout_s: float) -> None:
    """Until the balancer has a link to every server and an Echo reaches them all."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            links = c.status().get("links", {})
            down = sorted(n for n in c.topology.names if not links.get(n))
            if down:
                last = f"no link to {', '.join(down)}"
            else:
                tree = http_json(c.url + "/api/tree", timeout=30)
                if tree.get("complete"):
                    return
                last = f"Echo incomplete, missing {', '.join(tree.get('missing', []))}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RunError(f"the cluster was not linked up after {timeout_s:g} s: {last}")


def run_workload(c: Cluster, w: Workload, policy: str, seed: int) -> RunResult:
    """Submit `w` at its pace and poll until every task is done."""
    names = list(c.node_urls)
    cpus = {n: c.topology.server(n).cpus for n in names}
    with ThreadPoolExecutor(max_workers=min(16, len(names) + 1)) as pool:

        def states() -> list[dict[str, Any]]:
            return list(pool.map(lambda n: http_json(c.node_urls[n] + "/api/state"), names))

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
                list(pool.map(lambda b: http_json(c.url + "/api/tasks", _task_body(b)), batches))
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
                raise RunError(f"{w.name}: not done after {RUN_TIMEOUT_S:g} s")
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
        runner=c.runner,
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
        completed=done,
    )


def _task_body(b: Batch) -> dict[str, Any]:
    body: dict[str, Any] = {"node": b.node, "count": b.count, "duration_s": b.duration_s}
    if b.actual_s is not None:
        body["actual_s"] = b.actual_s
    return body
