"""What a compose deployment costs: image build, seconds until every service is healthy,
memory and CPU per node container, and the Echo and Finn wave times across containers,
for topologies of growing size.

    eval "$(bash ../shared/offline-docker/setup.sh)"   # here: engine, compose, base images
    python -m bench.compose_footprint                   # N = 7, 30, 60
    python -m bench.compose_footprint 7 30 60 100 --echo-samples 20

For each size a topology is generated (fixed seed, no periodic rebalancing so only the
measured waves run, the default wave deadline: `wave_timeout_s` 5 s, grown with the tree
by core/deadlines.py), rendered into a temporary directory and brought up with
`docker compose up -d --wait` naming every service but Grafana (which cannot run here);
the image is built once beforehand under a tag of its own (`TREEWAVE_IMAGE`, so another
checkout building `treewave:local` on the same engine cannot swap it), and that build is
timed separately. Then:

- up_s: from `up` to every named service healthy (`--wait` returning; up_attempts > 1
  when a container was briefly unhealthy on a busy host and `up` had to be run again;
  load_before/after: the host's load averages); first_complete_s:
  from `up` to the first complete Echo (every server linked and answering);
- memory per node container (`docker stats --no-stream`, after the waves): mean and max
  MiB, target under 60 MiB; the balancer's and Prometheus's too;
- idle CPU: the sum of every container's CPU% in that same sample (healthchecks, metrics
  scrapes, heartbeats); and, before the waves, `bench/idle_cpu.py` over `--idle-window`
  seconds: the stack's share of the whole machine, containers plus the Docker machinery
  each healthcheck costs (runc in the containerd shims, dockerd, containerd), by group,
  with the load average at that moment;
- Echo (GET /api/tree) and Finn (POST /api/finn with no work): the duration the balancer
  reports and the client-side round trip through the published port, median and p95;
- down_s: `docker compose down -v` (tried twice; `down_error` if it failed: two 200- and
  300-server runs once left their network behind).

Prints a table and writes bench/results/compose_footprint.json (merging with the sizes
already there, so sizes can be measured in separate runs). A size that fails is reported
with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.idle_cpu import idle_cpu
from tests.support.compose import run_compose
from tests.support.http import get_json
from tests.support.ports import free_port
from treewave.core.topology import Settings
from treewave.generator.generate import generate
from treewave.generator.render import render

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "compose_footprint.json"
SEED = 7
MEMORY_TARGET_MIB = 60.0
UP_ATTEMPTS = 5
IMAGE = f"treewave:bench-{os.getpid()}"
"""This run's own image tag (removed at the end)."""


def _memory_mib(text: str) -> float:
    """'12.3MiB / 23.4GiB' -> 12.3 (the used part, in MiB)."""
    used = text.split("/")[0].strip()
    units = {
        "B": 1 / 2**20,
        "KiB": 1 / 1024,
        "MiB": 1.0,
        "GiB": 1024.0,
        "kB": 1e3 / 2**20,
        "MB": 1e6 / 2**20,
        "GB": 1e9 / 2**20,
    }
    for unit in sorted(units, key=len, reverse=True):
        if used.endswith(unit):
            return float(used[: -len(unit)]) * units[unit]
    return float("nan")


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


API_TIMEOUT_S = 120.0


def _waves(
    url: str, method: str, body: Any, samples: int, token: str = ""
) -> tuple[list[float], list[float], int]:
    """(balancer-reported seconds, client seconds, how many were complete), with the API
    `token` if the balancer requires one."""
    reported, client, complete = [], [], 0
    for _ in range(samples):
        t0 = time.perf_counter()
        answer = get_json(url, method, body, timeout=API_TIMEOUT_S, token=token)
        client.append(time.perf_counter() - t0)
        reported.append(float(answer["duration_s"]))
        complete += bool(answer["complete"])
    return reported, client, complete


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 2),
        "p95_ms": round(_p95(values) * 1000, 2),
    }


class Deployment:
    def __init__(self, nodes: int, directory: Path) -> None:
        settings = Settings(task_time_s=1.0, rebalance_interval_s=0)
        self.topology = generate(nodes, SEED, extra_parents=max(1, nodes // 10), settings=settings)
        (directory / "topology.json").write_text(self.topology.dumps(), encoding="utf-8")
        render(self.topology, "topology.json", directory, build_context=str(REPO))
        self.directory = directory
        self.balancer_port = free_port()
        self.env = {
            **os.environ,
            "TREEWAVE_BIND_ADDRESS": "127.0.0.1",
            "TREEWAVE_BALANCER_PORT": str(self.balancer_port),
            "TREEWAVE_PROMETHEUS_PORT": str(free_port()),
            "TREEWAVE_GRAFANA_PORT": str(free_port()),
            "TREEWAVE_IMAGE": IMAGE,
        }
        self.project = f"treewave-bench-{nodes}-{secrets.token_hex(3)}"
        self.services = [*self.topology.names, "balancer", "prometheus"]

    def compose(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        return run_compose(self.project, self.directory, self.env, *args, timeout=timeout)

    def api(self, path: str) -> str:
        return f"http://127.0.0.1:{self.balancer_port}{path}"


def _first_complete(dep: Deployment, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get_json(dep.api("/api/tree"), timeout=API_TIMEOUT_S)["complete"]:
                return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _unhealthy(dep: Deployment) -> list[str] | None:
    """The names of the project's containers marked unhealthy (None if docker failed)."""
    ps = subprocess.run(
        [
            "docker",
            "ps",
            "--format",
            "{{.Names}}",
            "--filter",
            f"label=com.docker.compose.project={dep.project}",
            "--filter",
            "health=unhealthy",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return ps.stdout.split() if ps.returncode == 0 else None


def _until_none_unhealthy(dep: Deployment, timeout: float) -> None:
    """Wait for every container marked unhealthy to pass a check again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _unhealthy(dep) == []:
            return
        time.sleep(5)


def _stats(dep: Deployment) -> dict[str, Any]:
    ps = dep.compose("ps", "--format", "{{.Name}} {{.Service}}").stdout.splitlines()
    service_of = dict(line.split() for line in ps if line.strip())
    stats = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", "{{json .}}", *service_of],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    memory: dict[str, float] = {}
    cpu_percent = 0.0
    for line in stats.splitlines():
        row = json.loads(line)
        service = service_of[row["Name"]]
        memory[service] = _memory_mib(row["MemUsage"])
        cpu_percent += float(row["CPUPerc"].rstrip("%") or 0)
    nodes = [memory[n] for n in dep.topology.names if n in memory]
    return {
        "node_containers_measured": len(nodes),
        "node_memory_mib_mean": round(statistics.mean(nodes), 1),
        "node_memory_mib_max": round(max(nodes), 1),
        "node_memory_mib_total": round(sum(nodes), 1),
        "node_memory_under_target": max(nodes) < MEMORY_TARGET_MIB,
        "balancer_memory_mib": round(memory.get("balancer", float("nan")), 1),
        "prometheus_memory_mib": round(memory.get("prometheus", float("nan")), 1),
        "idle_cpu_percent_all_containers": round(cpu_percent, 1),
    }


def build(directory: Path) -> float:
    """Build the image once (from a 7-server render); returns the seconds it took."""
    dep = Deployment(7, directory)
    start = time.monotonic()
    built = dep.compose("build", "balancer")
    if built.returncode != 0:
        raise RuntimeError(f"build failed:\n{built.stdout}\n{built.stderr}")
    return round(time.monotonic() - start, 2)


def measure(
    nodes: int, echo_samples: int, finn_samples: int, idle_window_s: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"treewave-bench-{nodes}-") as tmp:
        dep = Deployment(nodes, Path(tmp))
        row: dict[str, Any] = {"nodes": nodes, "edges": len(dep.topology.edges)}
        try:
            row["load_before"] = [round(x, 1) for x in os.getloadavg()]
            start = time.monotonic()
            # On a busy host a healthcheck can time out while 30+ interpreters start at
            # once; the container is then "unhealthy" until its next check passes, and
            # `--wait` (and a `depends_on: service_healthy`) gives up. Count such
            # attempts and go on: `up` again starts whatever is missing.
            for attempt in range(1, UP_ATTEMPTS + 1):
                up = dep.compose("up", "-d", "--wait", *dep.services)
                if up.returncode == 0:
                    break
                row.setdefault("up_failures", []).append(
                    {
                        "after_s": round(time.monotonic() - start, 2),
                        "stderr": up.stderr[-1500:],
                        "unhealthy": _unhealthy(dep),
                    }
                )
                if attempt == UP_ATTEMPTS:
                    raise RuntimeError(f"up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
                _until_none_unhealthy(dep, timeout=300)
            row["up_s"] = round(time.monotonic() - start, 2)
            row["up_attempts"] = attempt
            if not _first_complete(dep):
                raise RuntimeError("no complete Echo within 600 s of start-up")
            row["first_complete_s"] = round(time.monotonic() - start, 2)
            time.sleep(10)  # let the last links and first scrapes settle
            row["idle_machine_percent"] = idle_cpu(
                dep.project, idle_window_s, frozenset(dep.topology.names)
            )
            row["load_idle"] = [round(x, 1) for x in os.getloadavg()]
            row["wave_deadline_s"] = get_json(dep.api("/api/status"), timeout=API_TIMEOUT_S)[
                "wave_deadline_s"
            ]

            reported, client, complete = _waves(dep.api("/api/tree"), "GET", None, echo_samples)
            row["echo"] = {
                "samples": echo_samples,
                "complete": complete,
                "balancer": _ms(reported),
                "client": _ms(client),
            }
            reported, client, complete = _waves(
                dep.api("/api/finn"), "POST", {"tasks_per_node": 0}, finn_samples
            )
            row["finn"] = {
                "samples": finn_samples,
                "complete": complete,
                "balancer": _ms(reported),
                "client": _ms(client),
            }
            row.update(_stats(dep))
            row["load_after"] = [round(x, 1) for x in os.getloadavg()]
        except Exception as exc:  # reported in the row; the run goes on
            row["error"] = str(exc)[-4000:]
            logs = dep.compose("ps", "-a").stdout
            row["ps"] = logs[-4000:]
        finally:
            start = time.monotonic()
            for _attempt in range(2):  # e.g. a network still busy while 300 containers go
                down = dep.compose("down", "-v", "--remove-orphans")
                if down.returncode == 0:
                    break
                row["down_error"] = down.stderr[-2000:]
            else:
                print(f"{dep.project}: docker compose down failed: {down.stderr}", file=sys.stderr)
            row["down_s"] = round(time.monotonic() - start, 2)
        return row


def _table(rows: list[dict[str, Any]]) -> str:
    columns: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
        ("N", lambda r: r["nodes"]),
        ("edges", lambda r: r["edges"]),
        ("up s", lambda r: r.get("up_s", "-")),
        ("up attempts", lambda r: r.get("up_attempts", "-")),
        ("complete s", lambda r: r.get("first_complete_s", "-")),
        ("node MiB mean", lambda r: r.get("node_memory_mib_mean", "-")),
        ("node MiB max", lambda r: r.get("node_memory_mib_max", "-")),
        ("idle CPU %", lambda r: r.get("idle_cpu_percent_all_containers", "-")),
        ("idle % machine", lambda r: r.get("idle_machine_percent", {}).get("stack_total", "-")),
        ("deadline s", lambda r: r.get("wave_deadline_s", "-")),
        ("echo ms med/p95", lambda r: _pair(r, "echo", "balancer")),
        ("echo client ms", lambda r: _pair(r, "echo", "client")),
        ("finn ms med/p95", lambda r: _pair(r, "finn", "balancer")),
        ("finn client ms", lambda r: _pair(r, "finn", "client")),
        ("down s", lambda r: r.get("down_s", "-")),
    ]
    lines = ["  ".join(f"{name:>15}" for name, _ in columns)]
    for row in rows:
        lines.append("  ".join(f"{value(row)!s:>15}" for _, value in columns))
        if "error" in row:
            lines.append(f"    N={row['nodes']} failed: {row['error'][:300]}")
    return "\n".join(lines)


def _pair(row: dict[str, Any], wave: str, side: str) -> str:
    if wave not in row:
        return "-"
    m = row[wave][side]
    return f"{m['median_ms']}/{m['p95_ms']}"


def _machine() -> dict[str, Any]:
    version = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True
    ).stdout.strip()
    compose = subprocess.run(
        ["docker", "compose", "version", "--short"], capture_output=True, text=True
    ).stdout.strip()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "platform": platform.platform(),
        "docker_engine": version,
        "docker_compose": compose,
        "python_image": os.environ.get("PYTHON_IMAGE", "python:3.12-slim (default)"),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sizes", nargs="*", type=int, default=[7, 30, 60])
    p.add_argument("--echo-samples", type=int, default=20)
    p.add_argument("--finn-samples", type=int, default=10)
    p.add_argument("--idle-window", type=float, default=30.0, help="idle sample, seconds")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="treewave-bench-build-") as tmp:
        build_s = build(Path(tmp))
    print(f"image build (once, before timing): {build_s} s", flush=True)
    rows = []
    try:
        for n in args.sizes:
            print(f"measuring N={n} ...", flush=True)
            row = measure(n, args.echo_samples, args.finn_samples, args.idle_window)
            rows.append(row)
            print(_table([row]).splitlines()[1], flush=True)
            print(f"    idle, % of the machine: {row.get('idle_machine_percent')}", flush=True)
    finally:
        subprocess.run(["docker", "image", "rm", IMAGE], capture_output=True, check=False)
    print()
    print(_table(rows))

    if not args.no_write:
        previous: dict[str, Any] = {}
        if RESULTS.exists():
            previous = json.loads(RESULTS.read_text(encoding="utf-8"))
        by_size = {r["nodes"]: r for r in previous.get("results", [])}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        command = " ".join(["python -m bench.compose_footprint", *argv])
        for row in rows:
            by_size[row["nodes"]] = {
                **row,
                "measured_at": now,
                "image_build_s": build_s,
                "command": command,
            }
        data = {
            "seed": SEED,
            "settings": {"wave_timeout_s": Settings().wave_timeout_s, "rebalance_interval_s": 0},
            "memory_target_mib": MEMORY_TARGET_MIB,
            "machine": _machine(),
            "results": [by_size[n] for n in sorted(by_size)],
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
