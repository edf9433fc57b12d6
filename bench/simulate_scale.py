"""How `treewave simulate` scales: one Echo and one Finn wave on 10k, 100k and 1M servers.

Each size runs in a fresh subprocess, so the peak resident memory reported (the child's
own `ru_maxrss`) belongs to that size alone. The child runs the same function as
`treewave simulate --nodes N --seed S --json` (random topology with 5% extra parent
edges, an in-memory network delivering in a seeded random order) and reports it together
with its wall and CPU time and peak memory ("echo s" and "finn s" are wall seconds
per wave; "total s" includes start-up and building the topology; "cpu s" is the child's
CPU time, which is what to compare on a busy machine). The parent prints a table and writes
`bench/results/simulate_scale.json`.

    .venv/bin/python -m bench.simulate_scale                  # 10k, 100k, 1M (some minutes)
    .venv/bin/python -m bench.simulate_scale --sizes 1000 5000 --seed 7
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "simulate_scale.json"


def child(nodes: int, seed: int) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    from treewave.cli.simulate_cmd import simulate  # imported here so import time counts too

    report = simulate(nodes, seed)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    report["total_seconds"] = round(total, 3)
    report["cpu_seconds"] = round(cpu, 3)
    report["peak_mib"] = round(peak_kib / 1024, 1)
    print(json.dumps(report))


def run_size(nodes: int, seed: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(nodes),
        "--seed",
        str(seed),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"size {nodes} failed (exit {done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "nodes",
        "edges |E|",
        "echo msgs",
        "=2|E|",
        "finn msgs",
        "directed",
        "finn/dir",
        "echo s",
        "finn s",
        "total s",
        "cpu s",
        "peak MiB",
    )
    lines = [head]
    for r in rows:
        e, f = r["echo"], r["finn"]
        lines.append(
            (
                f"{r['nodes']:,}",
                f"{r['edges']:,}",
                f"{e['messages']:,}",
                "yes" if e["messages"] == 2 * r["edges"] else "NO",
                f"{f['messages']:,}",
                f"{f['directed_edges']:,}",
                f"{f['messages'] / f['directed_edges']:.3f}",
                f"{e['seconds']:.2f}",
                f"{f['seconds']:.2f}",
                f"{r['total_seconds']:.2f}",
                f"{r['cpu_seconds']:.2f}",
                f"{r['peak_mib']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.child, args.seed)
        return 0
    rows = []
    for n in args.sizes:
        print(f"running {n:,} servers ...", file=sys.stderr, flush=True)
        rows.append(run_size(n, args.seed))
    print(table(rows))
    ok = all(
        r["echo"]["decided"]
        and r["finn"]["decided"]
        and r["finn"]["decided_once"]
        and r["echo"]["messages"] == 2 * r["edges"]
        for r in rows
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join(
            ["bench/simulate_scale.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "seed": args.seed,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "all_decided_and_exact": ok,
        "runs": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
