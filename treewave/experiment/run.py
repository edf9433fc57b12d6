"""Running an experiment: every policy on every seed's workload, on the spec's runner."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from treewave.core.policies import get_policy
from treewave.core.topology import Settings, Topology
from treewave.experiment.model import simulate
from treewave.experiment.results import RunResult
from treewave.experiment.spec import ExperimentSpec
from treewave.experiment.workloads import Workload, benchmark, generate

__all__ = ["COLUMNS", "Spread", "run_experiment", "summarise", "with_policy", "workload_for"]

COLUMNS = ("ratio", "tasks_moved", "bytes_moved", "mean_wait_s", "imbalance_mean")
"""The table's measured columns, each given as mean and spread over the seeds."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Spread:
    mean: float
    stdev: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), sd, min(values), max(values))


def workload_for(spec: ExperimentSpec, servers: Mapping[str, int], seed: int) -> Workload:
    w = spec.workload
    if w.benchmark is not None:
        return benchmark(w.benchmark, servers, seed, w.target_s)
    return generate(w.shape(), servers, seed)


def with_policy(topology: Topology, policy: str) -> Topology:
    """The topology with `settings.policy` set (how a cluster is told which to run)."""
    data = topology.to_json_data()
    data["settings"] = {**data["settings"], "policy": policy}
    return Topology.parse(data, "topology")


def run_experiment(
    spec: ExperimentSpec,
    topology: Topology,
    progress: Progress = lambda _: None,
    logs: Path | None = None,
) -> list[RunResult]:
    """Every (policy, seed) run, in that order."""
    servers = {s.name: s.cpus for s in topology.servers}
    workloads = {seed: workload_for(spec, servers, seed) for seed in spec.seeds}
    total = len(spec.policies) * len(workloads)
    results: list[RunResult] = []

    def note(r: RunResult) -> None:
        results.append(r)
        progress(
            f"[{len(results)}/{total}] {r.policy:<8} seed {r.seed}: makespan "
            f"{r.makespan_s:.2f} s (x{r.ratio:.3f} of the lower bound), {r.tasks_moved} moved"
        )

    if spec.runner == "model":
        for name in spec.policies:
            policy = get_policy(name)
            settings = Settings.model_validate({**topology.settings.model_dump(), "policy": name})
            for seed, w in workloads.items():
                note(simulate(servers, w, policy, settings, spec.model.round_s, seed))
        return results
    from treewave.experiment.local import LocalRunError, local_cluster, run_workload

    for name in spec.policies:
        progress(f"starting a local cluster of {len(servers)} servers for policy {name!r}")
        log = None if logs is None else logs / f"cluster-{name}.log"
        with local_cluster(with_policy(topology, name), log) as cluster:
            for seed, w in workloads.items():
                r = run_workload(cluster, w, name, seed)
                if r.reported_policy != name:
                    raise LocalRunError(
                        f"the balancer reports policy {r.reported_policy!r}, not {name!r}: "
                        "its results would be mislabelled"
                    )
                note(r)
    return results


def summarise(results: list[RunResult]) -> dict[str, dict[str, Spread]]:
    """Per policy (in run order), each column's spread over the seeds."""
    by: dict[str, list[RunResult]] = {}
    for r in results:
        by.setdefault(r.policy, []).append(r)
    return {
        p: {c: Spread.of([float(r.summary()[c]) for r in rs]) for c in COLUMNS}
        for p, rs in by.items()
    }
