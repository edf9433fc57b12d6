"""Chaos on a local cluster: steady load, periodic rebalancing, a server killed every 10 s.

    python -m bench.chaos                          # topology.json, 300 s
    python -m bench.chaos --duration 60            # a quick run
    python -m bench.chaos --servers 10 --seed 3    # a generated 10-server topology

Starts every server and the balancer as real processes on free loopback ports (each
server with a state directory, links authenticated with a fresh secret), rebalancing every
2 s with a 2 s wave deadline, then for `--duration` seconds:

- load: `--rate` submissions per second of `--batch` tasks (`POST /api/tasks`, `--task-s`
  seconds each) to random servers, so single-CPU servers queue work and rebalancing
  moves it; 202 means the server confirmed the tasks on disk, 503 that nothing was queued
  (the server was down), 504 that it did not confirm (the tasks may or may not be queued:
  counted apart, and checked never to run twice);
- waves: an Echo (`GET /api/tree`) every `--echo-every` seconds;
- chaos: every `--kill-every` seconds a random server is SIGKILLed and restarted from its
  state directory `--down-for` seconds later; from the restart, Echo waves are probed
  every 0.25 s until one is complete (the time to be complete again).

Then the load stops, every server is up, and the cluster drains (nothing queued, running
or reserved anywhere, no transfer in doubt). From every server's `/api/tasks`:

- created: the topology's initial tasks plus every confirmed (202) submission;
- completed, lost (created but not completed: must be 0), duplicated (an id completed on
  two servers, or counted twice: must be 0), unknown (completed but never created);
- waves that missed their deadline (the balancer's measured duration above deadline +
  0.5 s: must be 0), for the Echo waves this script ran and, from the balancer's
  histogram, for every wave (rebalancing's too); partial waves;
- the time from each restart until an Echo is complete again (median, max).

Prints a table and writes bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import secrets
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.cluster import BALANCER, ClusterOptions, Service, build_cluster, server_names
from tests.support.http import get_json, get_text
from treewave.core.randomtree import random_topology

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "chaos.json"
READY_TIMEOUT_S = 120.0


# --- processes ----------------------------------------------------------------------------


def load_topology_data(args: argparse.Namespace) -> dict[str, Any]:
    if args.servers:
        data: dict[str, Any] = random_topology(args.servers, args.seed).to_json_data()
    else:
        data = json.loads(Path(args.topology).read_text(encoding="utf-8"))
    data.setdefault("settings", {})
    data["settings"].update(
        {
            "task_time_s": args.task_s,
            "rebalance_interval_s": args.rebalance_interval,
            "wave_timeout_s": args.wave_timeout,
        }
    )
    return data


class LocalCluster:
    def __init__(self, topology: dict[str, Any], args: argparse.Namespace, run_dir: Path):
        self.topology = topology
        self.names = server_names(topology)
        self.run_dir = run_dir
        env = {"TREEWAVE_SECRET": secrets.token_hex(24)}
        options = ClusterOptions(
            env={name: env for name in [*self.names, BALANCER]},
            state_dir=True,
            wave_timeout_s=args.wave_timeout,
            rebalance_interval_s=args.rebalance_interval,
            tied=True,
        )
        self.procs: dict[str, Service] = build_cluster(topology, run_dir, options).services

    @property
    def balancer_url(self) -> str:
        return self.procs[BALANCER].url

    def start(self) -> None:
        for p in self.procs.values():
            p.start()

    def wait_complete(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every process is up and an Echo wave is complete."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if not p.alive()]
            if dead:
                raise RuntimeError(f"exited during start-up: {dead} (logs in {self.run_dir})")
            try:
                tree = get_json(self.balancer_url + "/api/tree", timeout=10)
                if tree["complete"]:
                    return
                last = tree["missing"]
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(0.5)
        raise RuntimeError(f"cluster not complete after {timeout:.0f} s: {last}")

    def tasks(self) -> dict[str, dict[str, Any]]:
        return {n: get_json(self.procs[n].url + "/api/tasks", timeout=10) for n in self.names}

    def stop_all(self) -> list[str]:
        for p in self.procs.values():
            p.stop()
        return [n for n, p in self.procs.items() if p.killed]


# --- the run --------------------------------------------------------------------------------


@dataclass
class Wave:
    started: float
    ended: float
    complete: bool
    duration_s: float
    missing: list[str]
    probe: bool
    """Run by the recovery probe right after a restart (else by the steady Echo loop)."""


@dataclass
class Restart:
    server: str
    killed_at: float
    restarted_at: float
    complete_at: float | None = None


@dataclass
class Record:
    waves: list[Wave] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)
    created: set[str] = field(default_factory=set)
    maybe: set[str] = field(default_factory=set)
    t0: float = field(default_factory=time.monotonic)
    submit_status: Counter[str] = field(default_factory=Counter)
    wave_errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def ids_of(answer: dict[str, Any]) -> list[str]:
    batch, first = answer["first_task"].rsplit(".", 1)
    _, last = answer["last_task"].rsplit(".", 1)
    return [f"{batch}.{i}" for i in range(int(first), int(last) + 1)]


def run_echo(cluster: LocalCluster, rec: Record, probe: bool) -> Wave | None:
    started = time.monotonic()
    try:
        tree = get_json(cluster.balancer_url + "/api/tree", timeout=60)
    except (OSError, ValueError) as exc:
        with rec.lock:
            rec.wave_errors[type(exc).__name__] += 1
        return None
    wave = Wave(
        started, time.monotonic(), tree["complete"], tree["duration_s"], tree["missing"], probe
    )
    with rec.lock:
        rec.waves.append(wave)
    return wave


def every(period: float, stop: threading.Event, action: Callable[[], None]) -> None:
    """Call `action` every `period` seconds (on a fixed schedule) until `stop`."""
    next_at = time.monotonic()
    while not stop.is_set():
        action()
        next_at += period
        stop.wait(max(0.0, next_at - time.monotonic()))


def load_loop(
    cluster: LocalCluster, rec: Record, args: argparse.Namespace, stop: threading.Event
) -> None:
    rng = random.Random(args.seed + 1)

    def submit() -> None:
        body = {"node": rng.choice(cluster.names), "count": args.batch, "duration_s": args.task_s}
        try:
            answer = get_json(cluster.balancer_url + "/api/tasks", "POST", body, timeout=60)
        except urllib.error.HTTPError as exc:
            status = str(exc.code)
            if exc.code == 504:
                with contextlib.suppress(ValueError, KeyError), rec.lock:
                    rec.maybe.update(ids_of(json.loads(exc.read())))
        except (OSError, ValueError) as exc:
            status = type(exc).__name__
        else:
            status = "202"
            with rec.lock:
                rec.created.update(ids_of(answer))
        with rec.lock:
            rec.submit_status[status] += 1

    every(1.0 / args.rate, stop, submit)


def chaos_loop(cluster: LocalCluster, rec: Record, args: argparse.Namespace, end: float) -> None:
    """Kill a random server every `kill_every` s until `end`, restart it `down_for` s
    later, and probe Echo waves until the cluster is complete again.

    Runs in the main thread: servers are (re)started from it so that their parent-death
    signal (tied to the thread that spawned them) only fires when the script ends."""
    rng = random.Random(args.seed)
    next_kill = time.monotonic() + args.kill_every
    while next_kill < end:
        time.sleep(max(0.0, next_kill - time.monotonic()))
        next_kill += args.kill_every
        victim = rng.choice(cluster.names)
        proc = cluster.procs[victim]
        killed_at = time.monotonic()
        proc.kill()
        time.sleep(args.down_for)
        proc.start()
        restart = Restart(victim, killed_at, time.monotonic())
        with rec.lock:
            rec.restarts.append(restart)
        print(f"  {time.monotonic() - rec.t0:6.1f} s  killed and restarted {victim}", flush=True)
        while time.monotonic() < next_kill - 0.5:
            wave = run_echo(cluster, rec, probe=True)
            if wave is not None and wave.complete and wave.started >= restart.restarted_at:
                restart.complete_at = wave.ended
                break
            time.sleep(0.25)
    time.sleep(max(0.0, end - time.monotonic()))


def drain(cluster: LocalCluster, timeout: float) -> tuple[float, dict[str, dict[str, Any]]]:
    """Until nothing is queued, running or reserved and no transfer is in doubt."""
    started = time.monotonic()
    while True:
        try:
            tasks = cluster.tasks()
            in_doubt = get_json(cluster.balancer_url + "/api/status")["in_doubt"]
            busy = sum(
                len(t["queued"]) + len(t["running"]) + len(t["reserved"]) for t in tasks.values()
            )
            if busy == 0 and in_doubt == 0:
                return time.monotonic() - started, tasks
        except (OSError, ValueError):
            pass
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"the cluster did not drain in {timeout:.0f} s")
        time.sleep(1.0)


def histogram_over(metrics_text: str, limit: float) -> dict[str, int]:
    """Waves per algorithm whose duration exceeded `limit` (a bucket bound), from the
    balancer's wave duration histogram."""
    counts: dict[str, float] = {}
    within: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("treewave_wave_duration_seconds_count{"):
            algo = line.split('algorithm="')[1].split('"')[0]
            counts[algo] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("treewave_wave_duration_seconds_bucket{"):
            labels = line.split("{", 1)[1].split("}", 1)[0]
            le = labels.split('le="')[1].split('"')[0]
            if le != "+Inf" and abs(float(le) - limit) < 1e-9:
                algo = labels.split('algorithm="')[1].split('"')[0]
                within[algo] = float(line.rsplit(" ", 1)[1])
    return {a: int(c - within.get(a, 0.0)) for a, c in counts.items()}


def metric_total(metrics_text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels = line.split("{", 1)[1].split("}", 1)[0] if "{" in line else ""
            key = ",".join(part.split("=", 1)[1].strip('"') for part in labels.split(",") if part)
            out[key] = float(line.rsplit(" ", 1)[1])
    return out


def account(
    topology: dict[str, Any], rec: Record, tasks: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    created = set(rec.created)
    for s in topology["servers"]:
        created.update(f"{s['name']}:init:{k}" for k in range(1, s.get("tasks", 0) + 1))
    where: Counter[str] = Counter()
    for t in tasks.values():
        where.update(t["completed"])
    completed = set(where)
    duplicated = sorted(tid for tid, n in where.items() if n > 1)
    counted = sum(t["completed_count"] for t in tasks.values())
    leftover = [
        tid for t in tasks.values() for p in ("queued", "running", "reserved") for tid in t[p]
    ]
    maybe = rec.maybe - created
    return {
        "created": len(created),
        "completed": len(completed & created),
        "lost": len(created - completed),
        "lost_ids": sorted(created - completed)[:20],
        "duplicated": len(duplicated) + max(0, counted - len(completed)),
        "duplicated_ids": duplicated[:20],
        "completion_counters": counted,
        "unconfirmed_tasks": len(maybe),
        "unconfirmed_completed": len(maybe & completed),
        "unknown_completed": len(completed - created - maybe),
        "left_over": len(leftover),
    }


def _shown(path: Path) -> str:
    """A path as it goes into the results: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    topology = load_topology_data(args)
    run_dir = Path(tempfile.mkdtemp(prefix="treewave-chaos-"))
    cluster = LocalCluster(topology, args, run_dir)
    rec = Record()
    stop = threading.Event()
    ok = False
    print(f"chaos: {len(cluster.names)} servers, {args.duration:.0f} s, logs in {run_dir}")
    try:
        cluster.start()
        cluster.wait_complete()
        rec.t0 = time.monotonic()
        threads = [
            threading.Thread(target=load_loop, args=(cluster, rec, args, stop), daemon=True),
            threading.Thread(
                target=every,
                args=(args.echo_every, stop, lambda: run_echo(cluster, rec, probe=False)),
                daemon=True,
            ),
        ]
        for t in threads:
            t.start()
        chaos_loop(cluster, rec, args, rec.t0 + args.duration)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        dead = [n for n, p in cluster.procs.items() if not p.alive()]
        if dead:
            raise RuntimeError(f"died on their own: {dead} (logs in {run_dir})")
        cluster.wait_complete()
        print("load stopped; draining", flush=True)
        drain_s, tasks = drain(cluster, args.drain_timeout)
        metrics_text = get_text(cluster.balancer_url + "/metrics", timeout=30)
        results = account(topology, rec, tasks)
        ok = True
    finally:
        stopped_badly = cluster.stop_all()
        if ok and not args.keep_logs and not stopped_badly:
            shutil.rmtree(run_dir, ignore_errors=True)

    limit = args.wave_timeout + args.slack
    echo = list(rec.waves)
    late = [w for w in echo if w.duration_s > limit]
    recoveries = [r.complete_at - r.restarted_at for r in rec.restarts if r.complete_at]
    waves_metric = metric_total(metrics_text, "treewave_waves_total")
    over_metric = histogram_over(metrics_text, limit) if abs(limit - 2.5) < 1e-9 else {"n/a": 0}
    return {
        "command": "python -m bench.chaos " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "servers": len(cluster.names),
            "topology": "generated" if args.servers else _shown(args.topology),
            "seed": args.seed,
            "duration_s": args.duration,
            "submissions_per_s": args.rate,
            "tasks_per_submission": args.batch,
            "task_s": args.task_s,
            "rebalance_interval_s": args.rebalance_interval,
            "wave_timeout_s": args.wave_timeout,
            "deadline_slack_s": args.slack,
            "kill_every_s": args.kill_every,
            "down_for_s": args.down_for,
            "echo_every_s": args.echo_every,
        },
        "tasks": {**results, "submissions": dict(rec.submit_status), "drain_s": round(drain_s, 1)},
        "waves": {
            "echo_run": len(echo),
            "echo_partial": sum(1 for w in echo if not w.complete),
            "echo_missed_deadline": len(late),
            "echo_duration_max_s": round(max((w.duration_s for w in echo), default=0.0), 3),
            "echo_client_max_s": round(max((w.ended - w.started for w in echo), default=0.0), 3),
            "echo_errors": dict(rec.wave_errors),
            "all_waves_by_outcome": waves_metric,
            "all_waves_missed_deadline": over_metric,
        },
        "transfers": {
            "by_outcome": metric_total(metrics_text, "treewave_transfers_total"),
            "tasks_moved": metric_total(metrics_text, "treewave_tasks_moved_total").get("", 0),
            "rebalance_rounds": metric_total(metrics_text, "treewave_rebalance_runs_total").get(
                "", 0
            ),
        },
        "restarts": {
            "count": len(rec.restarts),
            "recovered": len(recoveries),
            "complete_again_s": summarize(recoveries),
            "by_server": dict(Counter(r.server for r in rec.restarts)),
            "each": [
                {
                    "server": r.server,
                    "restarted_at_s": round(r.restarted_at - rec.t0, 1),
                    "complete_again_s": None
                    if r.complete_at is None
                    else round(r.complete_at - r.restarted_at, 3),
                }
                for r in rec.restarts
            ],
        },
        "processes_ignoring_sigterm": stopped_badly,
    }


def print_table(r: dict[str, Any]) -> None:
    t, w, rs, tr = r["tasks"], r["waves"], r["restarts"], r["transfers"]
    rows = [
        ("servers / duration", f"{r['config']['servers']} / {r['config']['duration_s']:.0f} s"),
        ("kills (SIGKILL + restart)", f"{rs['count']}"),
        ("tasks created", t["created"]),
        ("tasks completed", t["completed"]),
        ("tasks lost (must be 0)", t["lost"]),
        ("duplicated completions (must be 0)", t["duplicated"]),
        (
            "tasks in unconfirmed submissions (504)",
            f"{t['unconfirmed_tasks']} ({t['unconfirmed_completed']} of them ran, once)",
        ),
        (
            "submissions by status",
            ", ".join(f"{k}: {v}" for k, v in sorted(t["submissions"].items())),
        ),
        ("Echo waves run", w["echo_run"]),
        ("partial Echo waves", w["echo_partial"]),
        ("Echo waves that missed deadline+slack (0)", w["echo_missed_deadline"]),
        ("all waves over deadline+slack (histogram)", w["all_waves_missed_deadline"]),
        (
            "longest Echo (balancer / client)",
            f"{w['echo_duration_max_s']} s / {w['echo_client_max_s']} s",
        ),
        ("complete again after restart (median)", f"{rs['complete_again_s']['median']} s"),
        ("complete again after restart (max)", f"{rs['complete_again_s']['max']} s"),
        ("restarts that recovered before the next kill", f"{rs['recovered']} of {rs['count']}"),
        ("transfers by outcome", ", ".join(f"{k}: {v:.0f}" for k, v in tr["by_outcome"].items())),
        ("tasks moved by rebalancing", f"{tr['tasks_moved']:.0f}"),
        ("drain after the load stopped", f"{t['drain_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of chaos (default 300)")
    p.add_argument("--topology", type=Path, default=REPO / "topology.json")
    p.add_argument("--servers", type=int, default=0, help="generate a topology of N servers")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=2.0, help="submissions per second")
    p.add_argument("--batch", type=int, default=3, help="tasks per submission")
    p.add_argument("--task-s", type=float, default=0.5, help="seconds per task")
    p.add_argument("--rebalance-interval", type=float, default=2.0)
    p.add_argument("--wave-timeout", type=float, default=2.0)
    p.add_argument("--slack", type=float, default=0.5, help="allowed lateness of a wave")
    p.add_argument("--kill-every", type=float, default=10.0)
    p.add_argument("--down-for", type=float, default=2.0)
    p.add_argument("--echo-every", type=float, default=1.0)
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep-logs", action="store_true", help="keep the run directory")
    args = p.parse_args(argv)
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    t, w = result["tasks"], result["waves"]
    failed = t["lost"] or t["duplicated"] or t["unknown_completed"] or w["echo_missed_deadline"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
