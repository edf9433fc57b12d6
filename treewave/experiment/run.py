"""Running an experiment: every policy on every seed's workload, on the spec's runner."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from treewave.core.policies import get_policy
from treewave.core.topology import Settings, Topology
from treewave.experiment.drive import RunError, run_workload
from treewave.experiment.model import simulate
from treewave.experiment.results import RunResult
from treewave.experiment.spec import ExperimentSpec
from treewave.experiment.workloads import Workload, benchmark, generate

__all__ = [
    "COLUMNS",
    "RunnerUnavailable",
    "Spread",
    "check_runner",
    "run_experiment",
    "summarise",
    "with_policy",
    "workload_for",
]

COLUMNS = ("ratio", "tasks_moved", "bytes_moved", "mean_wait_s", "imbalance_mean")
"""The table's measured columns, each given as mean and spread over the seeds."""

Progress = Callable[[str], None]


class RunnerUnavailable(Exception):
    """The spec's runner cannot run on this machine (e.g. no Docker): nothing started."""


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
    """Every (policy, seed) run, in that order. Raises `RunnerUnavailable` before
    anything starts when the runner cannot run here, `RunError` when a real run fails."""
    check_runner(spec)
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
    if spec.runner == "local":
        _run_local(spec, topology, workloads, note, progress, logs)
    else:
        _run_compose(spec, topology, workloads, note, progress, logs)
    return results


def check_runner(spec: ExperimentSpec) -> None:
    """Raise `RunnerUnavailable` (one line) when the spec's runner cannot run here."""
    if spec.runner == "compose":
        from treewave.experiment.compose import compose_problem

        if problem := compose_problem():
            raise RunnerUnavailable(problem)


def _checked(r: RunResult, name: str) -> RunResult:
    """A real run's result, once the balancer said it ran the policy it was given."""
    if r.reported_policy != name:
        raise RunError(
            f"the balancer reports policy {r.reported_policy!r}, not {name!r}: "
            "its results would be mislabelled"
        )
    return r


def _run_local(
    spec: ExperimentSpec,
    topology: Topology,
    workloads: dict[int, Workload],
    note: Callable[[RunResult], None],
    progress: Progress,
    logs: Path | None,
) -> None:
    """One `treewave run` cluster per policy, every seed's workload on it in turn."""
    from treewave.experiment.local import local_cluster

    for name in spec.policies:
        progress(f"starting a local cluster of {len(topology)} servers for policy {name!r}")
        log = None if logs is None else logs / f"cluster-{name}.log"
        with local_cluster(with_policy(topology, name), log) as cluster:
            for seed, w in workloads.items():
                note(_checked(run_workload(cluster, w, name, seed), name))


def _run_compose(
    spec: ExperimentSpec,
    topology: Topology,
    workloads: dict[int, Workload],
    note: Callable[[RunResult], None],
    progress: Progress,
    logs: Path | None,
) -> None:
    """A fresh Compose stack per policy and seed (nothing carried over between runs)."""
    from treewave.experiment.compose import build_image, compose_cluster, project_name

    started = time.monotonic()
    progress("building the image (docker compose build, as the rendered compose file says)")
    image = build_image(topology)
    progress(f"image {image} built in {time.monotonic() - started:.1f} s")
    for name in spec.policies:
        for seed, w in workloads.items():
            project = project_name(name, seed)
            log = None if logs is None else logs / f"compose-{name}-seed{seed}.log"
            with compose_cluster(with_policy(topology, name), project, image, log, progress) as c:
                progress(f"{project}: workload {w.name!r}, {w.tasks} tasks, policy {name!r}")
                r = _checked(run_workload(c, w, name, seed), name)
                r.compose_project = project
            note(r)


def summarise(results: list[RunResult]) -> dict[str, dict[str, Spread]]:
    """Per policy (in run order), each column's spread over the seeds."""
    by: dict[str, list[RunResult]] = {}
    for r in results:
        by.setdefault(r.policy, []).append(r)
    return {
        p: {c: Spread.of([float(r.summary()[c]) for r in rs]) for c in COLUMNS}
        for p, rs in by.items()
    }
