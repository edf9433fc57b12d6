"""What the Swarm target costs across hosts, next to the same topology under Compose:
seconds from `docker stack deploy` to every service healthy, Echo and Finn wave times
across hosts, memory per container.

    eval "$(bash ../shared/offline-docker/setup.sh)"    # here: engine, compose, base images
    python -m bench.swarm_footprint                      # N = 12, 30 over 3 hosts
    python -m bench.swarm_footprint 12 30 --no-compose   # Swarm only

Needs root and the multihost lab (`../shared/multihost-lab`, or TREEWAVE_MULTIHOST_LAB):
a real 3-host swarm on this machine, one network namespace and `dockerd` per host. The
lab is brought up once (the image is built and copied into every host first, timed
apart) and always removed at the end; the script refuses to run when a lab is already up.

For each size a topology is generated exactly as `compose_footprint.py` does (seed 7, no
periodic rebalancing, 10 s wave deadline), rendered with `treewave render --target swarm
--hosts 3` and deployed as its own stack:

- deploy_s: from `docker stack deploy` to every service's task running and healthy (each
  host asked by its own engine); first_complete_s: to the first complete Echo;
- Echo (GET /api/tree) and Finn (POST /api/finn, no work): balancer-reported duration and
  client round trip (to the balancer's host-mode port on host 1), median and p95;
- memory per server container (`docker stats --no-stream` on every host);
- then, unless --no-compose, the same topology under Compose on this machine's engine
  (`compose_footprint.measure`), for the comparison.

Prints a table and writes bench/results/swarm_footprint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import compose_footprint as cf
from tests.support.http import get_json
from treewave.core.topology import Settings
from treewave.generator.generate import generate
from treewave.generator.render import HOST_LABEL, render_swarm

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results" / "swarm_footprint.json"
HOSTS = 3
LAB_STATE = Path("/run/twlab")
IMAGE = "treewave:bench-swarm"


def lab_directory() -> Path:
    return Path(os.environ.get("TREEWAVE_MULTIHOST_LAB", REPO.parent / "shared" / "multihost-lab"))


def _run(args: list[str], timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, **env},
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed: {done.stderr[-2000:]}")
    return done


class Lab:
    def __init__(self) -> None:
        self.directory = lab_directory()
        self.prometheus_image = os.environ.get("PROMETHEUS_IMAGE", "prom/prometheus:v2.53.0")
        self.sockets: list[str] = []

    def up(self) -> dict[str, float]:
        if any(LAB_STATE.glob("h*.pid")):
            raise RuntimeError(f"a multihost lab is already up ({LAB_STATE}); only one can exist")
        start = time.monotonic()
        _run(["docker", "build", "-q", "-t", IMAGE, "-f", str(REPO / "docker" / "Dockerfile"),
              "--build-arg", f"PYTHON_IMAGE={os.environ.get('PYTHON_IMAGE', 'python:3.12-slim')}",
              str(REPO)])  # fmt: skip
        built = time.monotonic()
        up = _run(["bash", str(self.directory / "up.sh"), str(HOSTS), IMAGE])
        line = next(x for x in up.stdout.splitlines() if x.startswith("export TWLAB_SOCKETS="))
        self.sockets = line.split("=", 1)[1].strip('"').split()
        _run(["bash", "-c", 'set -o pipefail; docker save "$1" | docker -H "$2" load -q', "-",
              self.prometheus_image, self.sockets[0]])  # fmt: skip
        for host, sock in enumerate(self.sockets, 1):
            node = _run(["docker", "-H", sock, "info", "--format", "{{.Swarm.NodeID}}"])
            _run(["docker", "-H", self.sockets[0], "node", "update", "--label-add",
                  f"{HOST_LABEL}=h{host}", node.stdout.strip()])  # fmt: skip
        return {
            "image_build_s": round(built - start, 1),
            "lab_up_s": round(time.monotonic() - built, 1),
        }

    def down(self) -> None:
        subprocess.run(["bash", str(self.directory / "down.sh")], capture_output=True, check=False)
        subprocess.run(["docker", "rmi", IMAGE], capture_output=True, check=False)

    def docker(self, host: int, *args: str) -> str:
        return _run(["docker", "-H", self.sockets[host - 1], *args]).stdout


def _healthy(lab: Lab, stack: str, services: list[str]) -> bool:
    seen = set()
    for host in range(1, HOSTS + 1):
        fmt = '{{.Label "com.docker.swarm.service.name"}} {{.Status}}'
        label = f"label=com.docker.stack.namespace={stack}"
        out = lab.docker(host, "ps", "--filter", label, "--format", fmt)
        for line in out.splitlines():
            service, _, status = line.partition(" ")
            if "(healthy)" in status or (service.endswith("_prometheus") and "Up" in status):
                seen.add(service.removeprefix(f"{stack}_"))
    return set(services) <= seen


def _memory(lab: Lab, stack: str, servers: list[str]) -> dict[str, Any]:
    memory: dict[str, float] = {}
    for host in range(1, HOSTS + 1):
        ids = lab.docker(host, "ps", "-q", "--filter", f"label=com.docker.stack.namespace={stack}")
        if not ids.split():
            continue
        out = lab.docker(host, "stats", "--no-stream", "--format", "{{json .}}", *ids.split())
        for line in out.splitlines():
            row = json.loads(line)
            service = row["Name"].split(".")[0].removeprefix(f"{stack}_")
            memory[service] = cf._memory_mib(row["MemUsage"])
    nodes = [memory[n] for n in servers if n in memory]
    return {
        "node_containers_measured": len(nodes),
        "node_memory_mib_mean": round(statistics.mean(nodes), 1),
        "node_memory_mib_max": round(max(nodes), 1),
        "balancer_memory_mib": round(memory.get("balancer", float("nan")), 1),
        "prometheus_memory_mib": round(memory.get("prometheus", float("nan")), 1),
    }


def measure_swarm(lab: Lab, nodes: int, echo_samples: int, finn_samples: int) -> dict[str, Any]:
    settings = Settings(task_time_s=1.0, rebalance_interval_s=0, wave_timeout_s=10.0)
    topology = generate(nodes, cf.SEED, extra_parents=max(1, nodes // 10), settings=settings)
    stack = f"twb{nodes}"
    row: dict[str, Any] = {"nodes": nodes, "edges": len(topology.edges), "hosts": HOSTS}
    api = "http://10.77.0.11:7999"
    with tempfile.TemporaryDirectory(prefix=f"treewave-swarm-{nodes}-") as tmp:
        out = Path(tmp)
        (out / "topology.json").write_text(topology.dumps(), encoding="utf-8")
        render_swarm(topology, "topology.json", out, hosts=HOSTS)
        token = (out / "secrets" / "api-token").read_text().strip()
        services = [*topology.names, "balancer", "prometheus"]
        try:
            row["load_before"] = [round(x, 1) for x in os.getloadavg()]
            start = time.monotonic()
            _run(["docker", "stack", "deploy", "-c", str(out / "stack.yml"), stack],
                 DOCKER_HOST=lab.sockets[0], TREEWAVE_IMAGE=IMAGE,
                 PROMETHEUS_IMAGE=lab.prometheus_image)  # fmt: skip
            while not _healthy(lab, stack, services):
                if time.monotonic() - start > 900:
                    raise RuntimeError("not every service healthy within 900 s")
                time.sleep(1)
            row["deploy_s"] = round(time.monotonic() - start, 2)
            while True:
                try:
                    tree = get_json(f"{api}/api/tree", timeout=cf.API_TIMEOUT_S, token=token)
                    if tree["complete"]:
                        break
                except OSError:
                    pass
                if time.monotonic() - start > 900:
                    raise RuntimeError("no complete Echo within 900 s")
                time.sleep(0.5)
            row["first_complete_s"] = round(time.monotonic() - start, 2)
            reported, client, complete = cf._waves(
                f"{api}/api/tree", "GET", None, echo_samples, token
            )
            row["echo"] = {"samples": echo_samples, "complete": complete,
                           "balancer": cf._ms(reported), "client": cf._ms(client)}  # fmt: skip
            reported, client, complete = cf._waves(
                f"{api}/api/finn", "POST", {"tasks_per_node": 0}, finn_samples, token
            )
            row["finn"] = {"samples": finn_samples, "complete": complete,
                           "balancer": cf._ms(reported), "client": cf._ms(client)}  # fmt: skip
            row.update(_memory(lab, stack, list(topology.names)))
            row["load_after"] = [round(x, 1) for x in os.getloadavg()]
        except Exception as exc:  # reported in the row; the run goes on
            row["error"] = str(exc)[-3000:]
        finally:
            subprocess.run(["docker", "-H", lab.sockets[0], "stack", "rm", stack],
                           capture_output=True, check=False)  # fmt: skip
            for host in range(1, HOSTS + 1):  # wait until its containers are gone
                deadline = time.monotonic() + 300
                while (
                    time.monotonic() < deadline
                    and lab.docker(
                        host, "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={stack}"
                    ).strip()
                ):
                    time.sleep(1)
    return row


def _line(target: str, row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{target:>8} N={row['nodes']:>3} failed: {row['error'][:300]}"
    up = row.get("deploy_s", row.get("up_s"))
    echo, echo_client = cf._pair(row, "echo", "balancer"), cf._pair(row, "echo", "client")
    finn, finn_client = cf._pair(row, "finn", "balancer"), cf._pair(row, "finn", "client")
    return (
        f"{target:>8} N={row['nodes']:>3} up {up:>6} s  complete {row['first_complete_s']:>6} s  "
        f"echo {echo:>13} ms (client {echo_client})  finn {finn:>13} ms (client {finn_client})"
        f"  node MiB {row['node_memory_mib_mean']}/{row['node_memory_mib_max']}"
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sizes", nargs="*", type=int, default=[12, 30])
    p.add_argument("--echo-samples", type=int, default=20)
    p.add_argument("--finn-samples", type=int, default=10)
    p.add_argument(
        "--idle-window", type=float, default=30.0, help="Compose: idle CPU sample, seconds"
    )
    p.add_argument("--no-compose", action="store_true", help="skip the Compose comparison")
    p.add_argument("--no-swarm", action="store_true", help="only the Compose comparison")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    rows: list[dict[str, Any]] = []
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = " ".join(["python -m bench.swarm_footprint", *argv])
    if not args.no_swarm:
        lab = Lab()
        try:
            setup = lab.up()
            print(f"image build {setup['image_build_s']} s, lab up {setup['lab_up_s']} s")
            for n in args.sizes:
                row = measure_swarm(lab, n, args.echo_samples, args.finn_samples)
                rows.append({"target": "swarm", **row, **setup})
                print(_line("swarm", row), flush=True)
        finally:
            lab.down()
    if not args.no_compose:
        with tempfile.TemporaryDirectory(prefix="treewave-bench-build-") as tmp:
            cf.build(Path(tmp))
        for n in args.sizes:
            row = cf.measure(n, args.echo_samples, args.finn_samples, args.idle_window)
            rows.append({"target": "compose", **row})
            print(_line("compose", row), flush=True)

    if not args.no_write:
        previous: dict[str, Any] = {}
        if RESULTS.exists():
            previous = json.loads(RESULTS.read_text(encoding="utf-8"))
        keyed = {(r["target"], r["nodes"]): r for r in previous.get("results", [])}
        for row in rows:
            keyed[(row["target"], row["nodes"])] = {**row, "measured_at": now, "command": command}
        data = {
            "seed": cf.SEED,
            "settings": {"wave_timeout_s": 10.0, "rebalance_interval_s": 0},
            "hosts": HOSTS,
            "machine": cf._machine(),
            "results": [keyed[k] for k in sorted(keyed)],
        }
        RESULTS.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
