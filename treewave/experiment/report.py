"""What an experiment leaves behind: the table it prints, `results.json` and
`results.csv` with every run's raw measurements, and `report.html`, one self-contained
offline page whose plots are inline SVG drawn by matplotlib (the `plots` extra)."""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from treewave.experiment.results import RunResult
from treewave.experiment.run import COLUMNS, summarise
from treewave.experiment.spec import ExperimentSpec

__all__ = ["FIGURE_TITLES", "PlotsMissing", "require_plots", "table", "write_outputs"]

FIGURE_TITLES = {
    "makespan": "Makespan / lower bound per policy",
    "gantt": "Busy servers over time (first seed)",
    "imbalance": "Pressure imbalance over time (first seed)",
    "waves": "Wave latencies during the runs",
}
INSTALL = "pip install 'treewave[plots]'"
HEADERS = {
    "ratio": "makespan/LB",
    "tasks_moved": "moved",
    "bytes_moved": "bytes",
    "mean_wait_s": "wait s",
    "imbalance_mean": "imbalance s",
}


class PlotsMissing(RuntimeError):
    def __init__(self) -> None:
        super().__init__(f"the report's plots need matplotlib: {INSTALL}")


def require_plots() -> None:
    """Fail early (before anything runs) when the `plots` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotsMissing() from None


def table(results: list[RunResult]) -> str:
    """One row per policy: each column's mean ± standard deviation over the seeds."""
    rows = summarise(results)
    head = f"{'policy':<10}" + "".join(f" {HEADERS[c]:>18}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for policy, cols in rows.items():
        cells = []
        for c in COLUMNS:
            s = cols[c]
            digits = 3 if c in ("ratio", "mean_wait_s", "imbalance_mean") else 0
            cells.append(f" {f'{s.mean:.{digits}f} ± {s.stdev:.{digits}f}':>18}")
        lines.append(f"{policy:<10}" + "".join(cells))
    return "\n".join(lines)


def write_outputs(out: Path, spec: ExperimentSpec, results: list[RunResult]) -> list[Path]:
    """results.json, results.csv and report.html under `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {p: {c: vars(s) for c, s in cols.items()} for p, cols in summarise(results).items()}
    raw = {
        "spec": spec.model_dump(mode="json"),
        "summary": summary,
        "runs": [r.to_json() for r in results],
    }
    paths = [out / "results.json", out / "results.csv", out / "report.html"]
    paths[0].write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    with paths[1].open("w", newline="", encoding="utf-8") as f:
        rows = [r.summary() for r in results]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["policy"])
        writer.writeheader()
        writer.writerows(rows)
    paths[2].write_text(report_html(spec, results), encoding="utf-8")
    return paths


def report_html(spec: ExperimentSpec, results: list[RunResult]) -> str:
    require_plots()
    figures = "\n".join(
        f'<figure class="plot" data-figure="{name}">'
        f"<figcaption>{html.escape(FIGURE_TITLES[name])}</figcaption>"
        f"{_svg(name, results)}</figure>"
        for name in spec.wanted_figures()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>treewave experiment: {html.escape(spec.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; }}
pre {{ background: #f4f4f4; padding: 1em; overflow-x: auto; }}
figure.plot {{ margin: 2em 0; }} figcaption {{ font-weight: bold; margin-bottom: .5em; }}
figure.plot svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>treewave experiment: {html.escape(spec.name)}</h1>
<p>runner <b>{spec.runner}</b>, policies {html.escape(", ".join(spec.policies))},
seeds {", ".join(map(str, spec.seeds))}. Mean ± standard deviation over the seeds:</p>
<pre>{html.escape(table(results))}</pre>
{figures}
</body></html>
"""


def _svg(name: str, results: list[RunResult]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "treewave"
    policies = list(dict.fromkeys(r.policy for r in results))
    first = {p: next(r for r in results if r.policy == p) for p in policies}
    if name == "gantt":
        fig, axes = plt.subplots(
            len(policies),
            1,
            figsize=(10, 1.2 + 0.25 * len(first[policies[0]].busy) * len(policies)),
            sharex=True,
            squeeze=False,
        )
        for ax, p in zip(axes[:, 0], policies, strict=True):
            _gantt(ax, first[p])
    else:
        fig, ax = plt.subplots(figsize=(10, 4))
        if name == "makespan":
            _makespan(ax, results, policies)
        elif name == "imbalance":
            for p in policies:
                xs, ys = zip(*first[p].imbalance, strict=True) if first[p].imbalance else ((), ())
                ax.step(xs, ys, where="post", label=p)
            ax.set_xlabel("time (s)")
            ax.set_ylabel("max pressure - cluster pressure (s/cpu)")
            ax.legend()
        else:
            _waves(ax, results, policies)
    fig.suptitle(FIGURE_TITLES[name])
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _makespan(ax: Any, results: list[RunResult], policies: list[str]) -> None:
    ratios = {p: [r.ratio for r in results if r.policy == p] for p in policies}
    rows = summarise(results)
    ax.bar(
        policies,
        [rows[p]["ratio"].mean for p in policies],
        yerr=[rows[p]["ratio"].stdev for p in policies],
        color="#8ab4d8",
        capsize=4,
    )
    for i, p in enumerate(policies):
        ax.plot([i] * len(ratios[p]), ratios[p], "k.", alpha=0.6)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("makespan / lower bound")


def _gantt(ax: Any, r: RunResult) -> None:
    names = sorted(r.busy)
    for lane, n in enumerate(names):
        steps = r.busy[n]
        xs = [t for t, _ in steps]
        ys = [k / max(1, r.cpus.get(n, 1)) * 0.8 for _, k in steps]
        ax.fill_between(xs, lane, [lane + y for y in ys], step="post", color="#4a7ab0", lw=0)
    ax.set_yticks([i + 0.4 for i in range(len(names))])
    ax.set_yticklabels(names, fontsize=6)
    ax.set_title(f"{r.policy} (seed {r.seed}): bar height = share of cpus busy", fontsize=9)
    ax.set_xlabel("time (s)")


def _waves(ax: Any, results: list[RunResult], policies: list[str]) -> None:
    width = 0.8 / max(1, len(policies))
    labels: list[str] = []
    for i, p in enumerate(policies):
        merged: dict[float, int] = {}
        for r in results:
            if r.policy == p:
                for le, k in r.wave_latency_buckets:
                    merged[le] = merged.get(le, 0) + k
        bounds = sorted(merged)
        labels = [f"≤{b:g}" if b != float("inf") else ">" for b in bounds]
        ax.bar(
            [j + i * width for j in range(len(bounds))],
            [merged[b] for b in bounds],
            width=width,
            label=p,
        )
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_xlabel("wave duration (s)")
    ax.set_ylabel("waves")
    if not any(r.wave_latency_buckets for r in results):
        ax.text(
            0.5, 0.5, "no waves (the model runner has none)", ha="center", transform=ax.transAxes
        )
    ax.legend()
