"""Echo and Finn over the real services on one machine, started with `treewave run`.

    python -m bench.local_waves                    # topology.json, 200 runs of each
    python -m bench.local_waves --runs 500 --topology big.json

Starts `treewave run` on free ports with periodic rebalancing off, then measures, after a
few warm-up waves:

- Echo: `GET /api/tree`, as the balancer reports it (`duration_s`: first message out to
  decision) and as a client sees it (round trip on a kept-alive HTTP connection); every
  answer must be a 200 with a complete wave (the "N requests in a row without error" check);
- Finn: `POST /api/finn` with `tasks_per_node` 0 (the wave alone) and 1 (each server also
  enqueues a short task when it decides).

Prints a table (median, p95, max in milliseconds) against the targets (Echo < 50 ms median,
Finn < 100 ms median) and writes bench/results/local_waves.json. Stops the cluster (SIGINT)
however it ends.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.run import start_run

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "local_waves.json"
WARMUP = 10
TARGETS_MS = {"echo": 50.0, "finn": 100.0}


class Api:
    """One kept-alive HTTP connection to the balancer."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, body: Any = None) -> tuple[float, dict[str, Any]]:
        payload = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        started = time.perf_counter()
        self.conn.request(method, path, body=payload, headers=headers)
        resp = self.conn.getresponse()
        raw = resp.read()
        elapsed = time.perf_counter() - started
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {raw[:200]!r}")
        data: dict[str, Any] = json.loads(raw)
        return elapsed, data

    def close(self) -> None:
        self.conn.close()


def stats(values_s: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values_s)
    p95 = ms[min(len(ms) - 1, max(0, round(0.95 * len(ms)) - 1))]
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p95_ms": round(p95, 3),
        "max_ms": round(ms[-1], 3),
        "min_ms": round(ms[0], 3),
    }


def measure_wave(
    api: Api, runs: int, servers: int, method: str, path: str, body: Any, reached: str
) -> dict[str, Any]:
    """`runs` waves of one kind: the errors (a failed request, a wave whose `reached` list
    misses a server), the message count and the balancer's and the client's times of the
    complete ones (`complete`: how many)."""
    server_side: list[float] = []
    client_side: list[float] = []
    errors: list[str] = []
    messages = None
    for _ in range(runs):
        try:
            elapsed, answer = api.call(method, path, body)
        except (OSError, RuntimeError, http.client.HTTPException, ValueError) as exc:
            errors.append(str(exc))
            continue
        if not answer.get("complete") or len(answer.get(reached, [])) != servers:
            errors.append(f"partial wave {answer.get('wave_id')}: missing {answer.get('missing')}")
            continue
        server_side.append(float(answer["duration_s"]))
        client_side.append(elapsed)
        messages = answer.get("messages")
    return {
        "complete": len(server_side),
        "errors": errors[:10],
        "error_count": len(errors),
        "messages_per_wave": messages,
        "balancer": stats(server_side) if server_side else None,
        "client": stats(client_side) if client_side else None,
    }


def measure_echo(api: Api, runs: int, servers: int) -> dict[str, Any]:
    wave = measure_wave(api, runs, servers, "GET", "/api/tree", None, "nodes")
    complete = wave.pop("complete")
    return {"runs": runs, "ok_in_a_row": complete if not wave["error_count"] else None, **wave}


def measure_finn(api: Api, runs: int, servers: int, tasks_per_node: int) -> dict[str, Any]:
    body: dict[str, Any] = {"tasks_per_node": tasks_per_node}
    if tasks_per_node:
        body["duration_s"] = 0.01  # short tasks: the queues stay empty between waves
    wave = measure_wave(api, runs, servers, "POST", "/api/finn", body, "decided")
    del wave["complete"]
    return {"runs": runs, "tasks_per_node": tasks_per_node, **wave}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", type=Path, default=REPO / "topology.json")
    parser.add_argument("--runs", type=int, default=200, help="waves of each kind (200)")
    parser.add_argument("--port", type=int, default=0, help="balancer port (0: a free one)")
    parser.add_argument("--base-port", type=int, default=0, help="first server port (0: auto)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    topology = json.loads(args.topology.read_text(encoding="utf-8"))
    servers = len(topology["servers"])
    edges = sum(len(s.get("children", [])) for s in topology["servers"])
    started = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="treewave-bench-"))
    cluster = start_run(
        run_dir,
        "--log-level",
        "WARNING",
        port=args.port or None,
        base_port=args.base_port or None,
        topology=topology,
    )
    try:
        cluster.wait_ready(120)
        ready_s = time.monotonic() - started
        api = Api(cluster.balancer_port)
        try:
            for _ in range(WARMUP):
                api.call("GET", "/api/tree")
                api.call("POST", "/api/finn", {"tasks_per_node": 0})
            echo = measure_echo(api, args.runs, servers)
            finn0 = measure_finn(api, args.runs, servers, 0)
            finn1 = measure_finn(api, args.runs, servers, 1)
        finally:
            api.close()
    finally:
        try:
            code = cluster.stop(signal.SIGINT)
        finally:
            cluster.kill_everything()
            shutil.rmtree(run_dir, ignore_errors=True)

    result: dict[str, Any] = {
        "benchmark": "local_waves",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "system": platform.system(),
            "load_average_1m_5m_15m_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "topology": {
            "file": os.path.relpath(args.topology.resolve(), REPO),
            "servers": servers,
            "edges": edges,
        },
        "cluster_ready_s": round(ready_s, 2),
        "run_exit_code": code,
        "echo": echo,
        "finn_k0": finn0,
        "finn_k1": finn1,
        "targets_ms": TARGETS_MS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    rows = [
        ("Echo  GET /api/tree", echo, "echo"),
        ("Finn  K=0", finn0, "finn"),
        ("Finn  K=1", finn1, "finn"),
    ]
    print(
        f"{servers} servers, {edges} edges ({result['topology']['file']}); cluster ready in "
        f"{ready_s:.1f} s; {args.runs} runs each after {WARMUP} warm-up waves"
    )
    header = (
        f"{'wave':<22}{'msgs':>6}{'balancer median':>17}{'p95':>9}"
        f"{'client median':>15}{'p95':>9}{'errors':>8}  target"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for label, data, kind in rows:
        b, c = data["balancer"], data["client"]
        if b is None or c is None:
            print(f"{label:<22} no successful wave; errors: {data['errors'][:3]}")
            ok = False
            continue
        meets = b["median_ms"] < TARGETS_MS[kind] and data["error_count"] == 0
        ok = ok and meets
        print(
            f"{label:<22}{data['messages_per_wave']!s:>6}{b['median_ms']:>14.2f} ms"
            f"{b['p95_ms']:>6.2f} ms{c['median_ms']:>12.2f} ms{c['p95_ms']:>6.2f} ms"
            f"{data['error_count']:>8}  < {TARGETS_MS[kind]:g} ms median: "
            f"{'yes' if meets else 'NO'}"
        )
    in_a_row = echo["ok_in_a_row"]
    print(
        f"{args.runs} GET /api/tree in a row: "
        + (f"{in_a_row} complete, no error" if in_a_row == args.runs else "FAILED")
    )
    print(f"wrote {args.out}")
    return 0 if ok and in_a_row == args.runs and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
