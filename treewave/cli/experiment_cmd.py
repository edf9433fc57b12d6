"""`treewave experiment SPEC [--out DIR]`: compare balancing policies (treewave.experiment)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from treewave.cli.errors import CommandError, ConfigError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "experiment",
        help="compare balancing policies on one topology and one workload",
        description="Run the policies a spec file (TOML or JSON) names on its topology and "
        "workload, print a table (makespan / lower bound, tasks and bytes moved, mean wait, "
        "imbalance; mean ± spread over the seeds) and, with --out, write the raw results "
        "(results.json, results.csv) and an offline HTML report with plots (report.html). "
        "The spec's runner is `model` (a fast model), `local` (a `treewave run` cluster) "
        "or `compose` (a Docker Compose stack per policy and seed; needs Docker).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  treewave experiment examples/experiment-bimodal.toml --out results/",
    )
    p.add_argument("spec", type=Path, help="the experiment spec (.toml, or .json)")
    p.add_argument("--out", type=Path, default=None, help="directory for results and report")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from treewave.experiment.drive import RunError
    from treewave.experiment.report import PlotsMissing, require_plots, table, write_outputs
    from treewave.experiment.run import RunnerUnavailable, check_runner, run_experiment
    from treewave.experiment.spec import SpecError, load_spec

    try:
        spec, topology = load_spec(args.spec)
    except SpecError as exc:
        lines = "\n".join(f"  - {p}" for p in exc.problems)
        raise ConfigError(f"{exc.source}: {len(exc.problems)} problem(s):\n{lines}") from None
    try:
        check_runner(spec)
    except RunnerUnavailable as exc:
        raise ConfigError(str(exc)) from None
    if args.out is not None:
        try:
            require_plots()
        except PlotsMissing as exc:
            raise ConfigError(str(exc)) from None
    print(
        f"experiment {spec.name!r}: {len(spec.policies)} policies x {len(spec.seeds)} seeds "
        f"on the {spec.runner} runner, {len(topology)} servers, {topology.total_cpus} cpus",
        file=sys.stderr,
        flush=True,
    )
    logs = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        logs = args.out
    try:
        results = run_experiment(
            spec, topology, lambda line: print(line, file=sys.stderr, flush=True), logs
        )
    except RunnerUnavailable as exc:
        raise ConfigError(str(exc)) from None
    except RunError as exc:
        raise CommandError(str(exc)) from None
    print(table(results))
    if args.out is not None:
        for path in write_outputs(args.out, spec, results):
            print(f"wrote {path}", file=sys.stderr)
    return 0
