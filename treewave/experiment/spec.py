"""An experiment spec (TOML or JSON): the topology, the workload, the policies, the seeds
and the runner. `load_spec` reports every problem of a file at once (`SpecError`), before
anything runs.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from treewave.core.policies import UnknownPolicy, get_policy
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.topology import Settings, Topology, TopologyError, parse_topology_text
from treewave.experiment.workloads import (
    ARRIVALS,
    PLACEMENTS,
    SHAPES,
    Shape,
    benchmark_names,
)

__all__ = ["FIGURES", "ExperimentSpec", "SpecError", "load_spec", "parse_spec"]

FIGURES = ("makespan", "gantt", "imbalance", "waves")
"""Plots a report can hold; `waves` only for real runners (the model has no waves)."""

_STRICT = ConfigDict(frozen=True, extra="forbid")


class SpecError(ValueError):
    """A spec that cannot run; `problems` lists every one found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


class TopologySpec(BaseModel):
    """A topology file (relative to the spec), or a random tree from these parameters."""

    model_config = _STRICT
    file: str | None = None
    servers: int | None = Field(default=None, ge=1, le=10_000)
    seed: int = Field(default=0, ge=0)
    cpus: tuple[int, int] = (1, 4)
    max_children: int = Field(default=3, ge=1)
    extra_parents: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> TopologySpec:
        if (self.file is None) == (self.servers is None):
            raise ValueError("give either `file` or `servers` (a generated tree)")
        if not 1 <= self.cpus[0] <= self.cpus[1]:
            raise ValueError("cpus must be [low, high] with 1 <= low <= high")
        return self


class WorkloadSpec(BaseModel):
    """A benchmark workload by name, or a drawn one (fields of `workloads.Shape`)."""

    model_config = _STRICT
    benchmark: str | None = None
    arrivals: Literal["initial", "bursts", "stream"] = "initial"
    placement: Literal["hot", "zipf", "even"] = "hot"
    hot: int = Field(default=2, ge=1)
    zipf_s: float = Field(default=1.2, ge=0)
    tasks: int | None = Field(default=None, ge=1, le=1_000_000)
    target_s: float = Field(default=4.0, gt=0, le=3600)
    durations: Literal["fixed", "varied", "heavy-tailed", "bimodal"] = "fixed"
    duration_s: float = Field(default=0.5, gt=0, le=3600)
    varied_s: tuple[float, float] = (0.1, 1.5)
    heavy_min_s: float = Field(default=0.1, gt=0, le=3600)
    heavy_alpha: float = Field(default=1.5, gt=0)
    heavy_max_s: float = Field(default=10.0, gt=0, le=3600)
    short_s: float = Field(default=0.2, gt=0, le=3600)
    long_s: float = Field(default=2.0, gt=0, le=3600)
    long_share: float = Field(default=0.1, ge=0, le=1)
    declared: Literal["exact", "wrong"] = "exact"
    wrong_factor: tuple[float, float] = (0.5, 1.5)
    bursts: int = Field(default=3, ge=1)
    burst_gap_s: float = Field(default=1.0, ge=0)
    stream_s: float = Field(default=6.0, gt=0)
    stream_gap_s: float = Field(default=0.5, gt=0)

    @model_validator(mode="after")
    def _ranges(self) -> WorkloadSpec:
        if self.benchmark is not None and self.benchmark not in benchmark_names():
            raise ValueError(
                f"unknown benchmark {self.benchmark!r} (known: {', '.join(benchmark_names())})"
            )
        if not 0 < self.varied_s[0] <= self.varied_s[1]:
            raise ValueError("varied_s must be [low, high] with 0 < low <= high")
        if not 0 < self.wrong_factor[0] <= self.wrong_factor[1]:
            raise ValueError("wrong_factor must be [low, high] with 0 < low <= high")
        return self

    def shape(self) -> Shape:
        assert self.arrivals in ARRIVALS
        assert self.placement in PLACEMENTS
        assert self.durations in SHAPES
        fields = self.model_dump(exclude={"benchmark", "declared", "wrong_factor"})
        wrong = self.wrong_factor if self.declared == "wrong" else None
        return Shape(**fields, wrong_factor=wrong)


class ModelSpec(BaseModel):
    model_config = _STRICT
    round_s: float = Field(default=0.02, ge=0, le=60)


class ExperimentSpec(BaseModel):
    """The whole spec file."""

    model_config = _STRICT
    name: str = "experiment"
    runner: Literal["model", "local", "compose"] = "model"
    policies: tuple[str, ...] = Field(min_length=1)
    repetitions: int = Field(default=1, ge=1, le=1000)
    seed: int = Field(default=0, ge=0)
    """Repetition i uses workload seed `seed + i`."""
    topology: TopologySpec
    settings: dict[str, Any] = {}
    """Overrides of the topology's settings (`rebalance_interval_s`, `queue_order`, ...)."""
    workload: WorkloadSpec = WorkloadSpec()
    model: ModelSpec = ModelSpec()
    figures: tuple[Literal["makespan", "gantt", "imbalance", "waves"], ...] | None = None
    """Plots in the report (default: all that apply to the runner)."""

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.repetitions)]

    def wanted_figures(self) -> tuple[str, ...]:
        if self.figures is not None:
            return self.figures
        return tuple(f for f in FIGURES if f != "waves" or self.runner != "model")


def load_spec(path: Path) -> tuple[ExperimentSpec, Topology]:
    """Read and check `path` (TOML, or JSON for a `.json` name)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read it: {exc.strerror or exc}"]) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(
            str(path), [f"not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}"]
        ) from None
    return parse_spec(data, str(path), path.parent)


def parse_spec(data: Any, source: str, base: Path) -> tuple[ExperimentSpec, Topology]:
    """The spec and its topology (settings overrides applied); every problem at once."""
    problems: list[str] = []
    spec: ExperimentSpec | None = None
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "spec"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {msg}")
    raw = data if isinstance(data, dict) else {}
    for i, name in enumerate(_policy_names(raw)):
        try:
            get_policy(name)
        except UnknownPolicy as exc:
            problems.append(f"policies[{i}]: {exc}")
    topology: Topology | None = None
    if spec is not None:
        try:
            topology = _topology(spec, base)
        except TopologyError as exc:
            problems += [f"topology: {p}" for p in exc.problems]
        except (OSError, ValueError) as exc:
            problems.append(f"topology: {exc}")
    elif isinstance(raw.get("topology"), dict) and isinstance(raw["topology"].get("file"), str):
        file = base / raw["topology"]["file"]
        if not file.is_file():
            problems.append(f"topology.file: no such file {str(file)!r}")
    if problems:
        raise SpecError(source, problems)
    assert spec is not None
    assert topology is not None
    return spec, topology


def _policy_names(raw: dict[str, Any]) -> list[str]:
    names = raw.get("policies")
    if not isinstance(names, list | tuple):
        return []
    return [n for n in names if isinstance(n, str)]


def _topology(spec: ExperimentSpec, base: Path) -> Topology:
    t = spec.topology
    if t.file is not None:
        path = base / t.file
        if not path.is_file():
            raise ValueError(f"file: no such file {str(path)!r}")
        topo = parse_topology_text(path.read_text(encoding="utf-8"), str(path))
    else:
        assert t.servers is not None
        shape = TreeShape(
            max_children=t.max_children, extra_parents=t.extra_parents, cpus=t.cpus, tasks=(0, 0)
        )
        defaults = Settings(rebalance_interval_s=0.5, wave_timeout_s=30.0)
        topo = random_topology(t.servers, t.seed, shape, settings=defaults)
    data = topo.to_json_data()
    data["settings"] = {**data["settings"], **spec.settings}
    data["servers"] = [{**s, "tasks": 0} for s in data["servers"]]
    return Topology.parse(data, "topology")
