"""What a compose deployment costs: seconds until every service is healthy, memory per node
container, and the Echo round trip (GET /api/tree) for topologies of growing size.

    python bench/compose_footprint.py            # N = 7, 30
    python bench/compose_footprint.py 7 30 60

Each size is generated (fixed seed), rendered into a temporary directory, brought up with
`docker compose up --build -d --wait` (without Grafana, which cannot run here), measured
and torn down. Prints a table and writes bench/results/compose_footprint.json.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from generator.generate import generate  # noqa: E402
from generator.render import render  # noqa: E402

RESULTS = REPO / "bench" / "results" / "compose_footprint.json"
SEED = 7
ECHO_SAMPLES = 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


def measure(nodes: int) -> dict[str, Any]:
    topology = generate(nodes, SEED, extra_parents=max(1, nodes // 10))
    with tempfile.TemporaryDirectory(prefix=f"treewave-bench-{nodes}-") as tmp:
        directory = Path(tmp)
        (directory / "topology.json").write_text(topology.dumps(), encoding="utf-8")
        render(topology, "topology.json", directory, build_context=str(REPO))
        balancer_port = _free_port()
        env = {
            **os.environ,
            "TREEWAVE_BALANCER_PORT": str(balancer_port),
            "TREEWAVE_PROMETHEUS_PORT": str(_free_port()),
            "TREEWAVE_GRAFANA_PORT": str(_free_port()),
        }
        project = f"treewave-bench-{secrets.token_hex(3)}"
        base = ["docker", "compose", "-p", project, "-f", str(directory / "compose.yml")]

        def compose(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*base, *args],
                env=env,
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )

        services = [*topology.names, "balancer", "prometheus"]
        try:
            # Build first so the start-up time below does not include the image build.
            built = compose("build")
            if built.returncode != 0:
                raise RuntimeError(f"build failed:\n{built.stderr}")
            start = time.monotonic()
            up = compose("up", "-d", "--wait", *services)
            up_s = time.monotonic() - start
            if up.returncode != 0:
                raise RuntimeError(f"up failed:\n{up.stdout}\n{up.stderr}")
            names = compose("ps", "--format", "{{.Name}} {{.Service}}").stdout.split("\n")
            container_of: dict[str, str] = {}
            for line in names:
                if line.strip():
                    container, service = line.split()
                    container_of[service] = container
            node_containers = [container_of[n] for n in topology.names if n in container_of]
            stats = subprocess.run(
                ["docker", "stats", "--no-stream", "--format", "{{json .}}", *node_containers],
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            ).stdout
            memory = [_memory_mib(json.loads(line)["MemUsage"]) for line in stats.splitlines()]
            echo_ms = []
            for _ in range(ECHO_SAMPLES):
                t0 = time.perf_counter()
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{balancer_port}/api/tree", timeout=60
                ) as resp:
                    tree = json.loads(resp.read())
                echo_ms.append((time.perf_counter() - t0) * 1000)
            return {
                "nodes": nodes,
                "edges": len(topology.edges),
                "up_seconds": round(up_s, 2),
                "node_memory_mib_median": round(statistics.median(memory), 1),
                "node_memory_mib_max": round(max(memory), 1),
                "node_memory_mib_total": round(sum(memory), 1),
                "echo_ms_median": round(statistics.median(echo_ms), 1),
                "echo_complete": bool(tree.get("complete")),
            }
        finally:
            compose("down", "-v", "--remove-orphans")


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [7, 30]
    rows = [measure(n) for n in sizes]
    header = [
        "nodes",
        "edges",
        "up_seconds",
        "node_memory_mib_median",
        "node_memory_mib_max",
        "echo_ms_median",
        "echo_complete",
    ]
    print("  ".join(f"{h:>22}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>22}" for h in header))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"seed": SEED, "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
