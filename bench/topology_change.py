"""A topology change under load: queued tasks on removed servers drained into a new tree.

    python -m bench.topology_change                      # 10,000 tasks, 10 -> 30 servers
    python -m bench.topology_change --tasks 2000 --old 4 --new 8   # a quick run
    python -m bench.topology_change --compose            # the same under Docker Compose

Runs `treewave run` as a user does (every server and the balancer as real processes, each
server with a state directory), on a random topology of `--old` servers; queues `--tasks`
long tasks (600 s, so none completes during the measurement) spread evenly over them;
then writes a random topology of `--new` servers with none of the old names and sends
SIGHUP. The old servers are all removed: each is held, its queued tasks move to the new
servers through two-phase transfers, its running tasks are queued again at once
(`drain_grace_s` 0) and moved too; once it holds nothing it is retired and stopped.

Measured (the balancer's `GET /api/topology`, polled every 0.2 s, and every new server's
`GET /api/tasks` at the end):

- time from SIGHUP to the balancer adopting the topology, and to steady (every old
  server retired, nothing retiring);
- tasks moved (the balancer's per-server `moved`), lost (queued before, found nowhere
  after: must be 0), duplicated (found twice: must be 0).

With `--compose` (after `eval "$(bash ../shared/offline-docker/setup.sh)"` here): the
old topology is rendered and brought up under Docker Compose (servers and balancer only),
the tasks queued the same way, then `treewave apply` with the new file: it renders, starts
the 30 new containers, waits for them to be healthy, posts the topology, follows the drain
and removes the retired containers and volumes. Reported from the start of `apply`: when
the (recreated) balancer had adopted the new topology and when it was steady (every old
server retired), polling `GET /api/topology` every 0.2 s meanwhile, and when `apply`
returned (`apply_s`: also removing the 10 containers and their volumes); the tasks are
then read inside every new container.

Prints a table and writes bench/results/topology_change.json (`--compose`:
topology_change_compose.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.http import get_json
from tests.support.run import RunProcess, start_run, write_topology
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.topology import Settings

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "topology_change.json"
TASK_S = 600.0
SETTINGS = Settings(task_time_s=TASK_S, rebalance_interval_s=0, wave_timeout_s=10, drain_grace_s=0)


def topology(names: list[str], seed: int) -> dict[str, Any]:
    shape = TreeShape(
        max_children=3, extra_parents=max(1, len(names) // 10), cpus=(1, 2), tasks=(0, 0)
    )
    return random_topology(len(names), seed, shape, names=names, settings=SETTINGS).to_json_data()


def submit(run: RunProcess, node: str, count: int) -> set[str]:
    body = get_json(
        run.balancer_url + "/api/tasks",
        "POST",
        {"node": node, "count": count, "duration_s": TASK_S},
        timeout=120,
    )
    prefix = body["first_task"].rsplit(".", 1)[0]
    return {f"{prefix}.{i}" for i in range(count)}


def new_ports(run: RunProcess) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in run.output.splitlines():
        m = re.search(r"server (\S+) started \(port (\d+), pid \d+\)", line)
        if m:
            found[m[1]] = int(m[2])
    return found


def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    old = [f"old{i}" for i in range(args.old)]
    new = [f"new{i}" for i in range(args.new)]
    before = topology(old, args.seed)
    after = topology(new, args.seed + 1)
    run = start_run(directory, "--state-dir", str(directory / "state"), topology=before)
    try:
        run.wait_ready(timeout=300)
        ids: set[str] = set()
        per = args.tasks // len(old)
        for i, name in enumerate(old):
            ids |= submit(run, name, per + (1 if i < args.tasks % len(old) else 0))
        print(f"queued {len(ids)} tasks on {len(old)} servers", file=sys.stderr)

        write_topology(directory, after)
        mark = len(run.lines)
        started = time.monotonic()
        os.kill(run.proc.pid, signal.SIGHUP)
        run.wait_for(r"reload: the balancer adopted the new topology", 300, mark)
        adopted_s = time.monotonic() - started
        state: dict[str, Any] = {}
        deadline = started + args.timeout
        while time.monotonic() < deadline:
            state = get_json(run.balancer_url + "/api/topology", timeout=30)
            migration = state["migration"]
            if migration["state"] == "steady" and set(old) <= set(migration["retired"]):
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"not steady after {args.timeout} s: {state.get('migration')}")
        steady_s = time.monotonic() - started
        retired = state["migration"]["retired"]
        moved = sum(int(retired[n]["moved"]) for n in old)

        where: Counter[str] = Counter()
        ports = new_ports(run)
        for name in new:
            got = get_json(f"http://127.0.0.1:{ports[name]}/api/tasks", timeout=60)
            assert got["reserved"] == [], f"{name} keeps a reservation"
            where.update(got["queued"] + got["running"] + got["completed"])
        lost = len(ids - set(where))
        duplicated = sum(n - 1 for n in where.values() if n > 1)
        unknown = len(set(where) - ids)
        return {
            "old_servers": len(old),
            "new_servers": len(new),
            "tasks": len(ids),
            "adopted_s": round(adopted_s, 2),
            "steady_s": round(steady_s, 2),
            "moved": moved,
            "lost": lost,
            "duplicated": duplicated,
            "unknown": unknown,
        }
    finally:
        run.kill_everything()


def measure_compose(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    import importlib
    import secrets
    import subprocess

    from tests.support.compose import run_compose
    from tests.support.ports import free_port
    from treewave.cli.apply_cmd import NODE_TASKS
    from treewave.core.topology import Topology
    from treewave.generator.render import render

    old = [f"old{i}" for i in range(args.old)]
    new = [f"new{i}" for i in range(args.new)]
    before = Topology.parse(topology(old, args.seed))
    after = Topology.parse(topology(new, args.seed + 1))
    path = directory / "topology.json"
    path.write_text(before.dumps(), encoding="utf-8")
    render(before, "topology.json", directory, build_context=str(REPO))
    port = free_port()
    env = {
        **os.environ,
        "TREEWAVE_BIND_ADDRESS": "127.0.0.1",
        "TREEWAVE_BALANCER_PORT": str(port),
        "TREEWAVE_PROMETHEUS_PORT": str(free_port()),
        "TREEWAVE_GRAFANA_PORT": str(free_port()),
    }
    project = f"treewave-bench-migrate-{secrets.token_hex(3)}"
    url = f"http://127.0.0.1:{port}"

    def compose(*more: str) -> subprocess.CompletedProcess[str]:
        return run_compose(project, directory, env, *more, timeout=None)

    try:
        for attempt in range(3):
            up = compose("up", "--build", "-d", "--wait", *old, "balancer")
            if up.returncode == 0:
                break
            if attempt == 2:
                raise SystemExit(f"compose up failed: {up.stderr[-2000:]}")
        deadline = time.monotonic() + 300
        while not get_json(url + "/api/tree", timeout=60)["complete"]:
            if time.monotonic() > deadline:
                raise SystemExit("no complete tree")
            time.sleep(1)
        ids: set[str] = set()
        per = args.tasks // len(old)
        for i, name in enumerate(old):
            count = per + (1 if i < args.tasks % len(old) else 0)
            body = get_json(
                url + "/api/tasks",
                "POST",
                {"node": name, "count": count, "duration_s": TASK_S},
                timeout=120,
            )
            prefix = body["first_task"].rsplit(".", 1)[0]
            ids |= {f"{prefix}.{k}" for k in range(count)}
        print(f"queued {len(ids)} tasks on {len(old)} servers", file=sys.stderr)

        path.write_text(after.dumps(), encoding="utf-8")
        started = time.monotonic()
        milestones: dict[str, float] = {}
        applying = threading.Event()
        applying.set()

        def watch() -> None:
            """When the balancer adopted the new topology, and when it was steady."""
            wanted = after.to_json_data()
            while applying.is_set() and "steady" not in milestones:
                try:
                    state = get_json(url + "/api/topology", timeout=5)
                except OSError:  # the balancer is being recreated
                    time.sleep(0.2)
                    continue
                if state["topology"] == wanted:
                    milestones.setdefault("adopted", time.monotonic() - started)
                    migration = state["migration"]
                    if migration["state"] == "steady" and set(old) <= set(migration["retired"]):
                        milestones["steady"] = time.monotonic() - started
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        applied = subprocess.run(
            [
                sys.executable,
                "-m",
                "treewave.cli.main",
                "apply",
                "--topology",
                str(path),
                "--project",
                project,
                "--balancer",
                url,
                "--without",
                "prometheus",
                "--without",
                "grafana",
                "--timeout",
                str(args.timeout),
            ],
            env=env,
            cwd=directory,
            capture_output=True,
            text=True,
            check=False,
        )
        apply_s = time.monotonic() - started
        applying.clear()
        watcher.join(timeout=10)
        if applied.returncode != 0:
            raise SystemExit(f"apply failed:\n{applied.stdout[-3000:]}\n{applied.stderr[-3000:]}")
        summary = applied.stdout.strip().splitlines()[-1]
        state = get_json(url + "/api/topology", timeout=60)
        retired = state["migration"]["retired"]
        moved = sum(int(retired[n]["moved"]) for n in old)

        docker: Any = importlib.import_module("docker")  # the SDK (not the docker/ folder)
        engine = docker.from_env()
        label = f"com.docker.compose.project={project}"
        where: Counter[str] = Counter()
        services = set()
        for container in engine.containers.list(all=True, filters={"label": label}):
            service = container.labels.get("com.docker.compose.service", "")
            services.add(service)
            if service not in new:
                continue
            code, output = container.exec_run(["python", "-c", NODE_TASKS])
            assert code == 0, output
            got = json.loads(output)
            assert got["reserved"] == [], f"{service} keeps a reservation"
            where.update(got["queued"] + got["running"] + got["completed"])
        volumes = {
            v.attrs["Labels"].get("com.docker.compose.volume", "")
            for v in engine.volumes.list(filters={"label": label})
        }
        return {
            "old_servers": len(old),
            "new_servers": len(new),
            "tasks": len(ids),
            "adopted_s": _seconds(milestones.get("adopted")),
            "steady_s": _seconds(milestones.get("steady")),
            "apply_s": round(apply_s, 2),
            "apply_says": summary,
            "moved": moved,
            "lost": len(ids - set(where)),
            "duplicated": sum(n - 1 for n in where.values() if n > 1),
            "unknown": len(set(where) - ids),
            "old_containers_left": len(services & set(old)),
            "old_volumes_left": len(volumes & {f"state-{n}" for n in old}),
        }
    finally:
        compose("down", "-v", "--remove-orphans")


def _seconds(value: float | None) -> float | None:
    """Rounded, or None when the watcher never saw that milestone (a failed run)."""
    return None if value is None else round(value, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--old", type=int, default=10, help="servers removed")
    p.add_argument("--new", type=int, default=30, help="servers of the new topology")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--no-save", action="store_true", help="do not write the results file")
    p.add_argument("--compose", action="store_true", help="under Docker Compose, with apply")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tw-topology-change-") as tmp:
        result = measure_compose(args, Path(tmp)) if args.compose else measure(args, Path(tmp))
    result.update(
        {
            "command": " ".join(["python -m bench.topology_change", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}",
            "load_average": [round(x, 1) for x in os.getloadavg()],
            "mode": "compose (treewave apply)" if args.compose else "local (treewave run, SIGHUP)",
        }
    )
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    if not args.no_save:
        results = RESULTS.with_name("topology_change_compose.json") if args.compose else RESULTS
        results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if result["lost"] == result["duplicated"] == result["unknown"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
