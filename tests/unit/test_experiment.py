"""`treewave experiment` on the model runner: specs, workloads, determinism, outputs."""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest

from treewave.cli.main import main
from treewave.core.policies import get_policy
from treewave.core.topology import Settings
from treewave.experiment.compose import project_name, published_ports
from treewave.experiment.model import simulate
from treewave.experiment.spec import SpecError, load_spec, parse_spec
from treewave.experiment.workloads import Shape, benchmark, benchmark_names, generate

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("experiment-*.toml"))
MODEL_EXAMPLES = [p for p in EXAMPLES if load_spec(p)[0].runner == "model"]
SERVERS = {"a": 4, "b": 2, "c": 1, "d": 3, "e": 1, "f": 2}

SMALL = """
name = "small"
policies = ["lpt", "lab"]
repetitions = 2
seed = 3
[topology]
servers = 5
seed = 1
[settings]
rebalance_interval_s = 0.2
[workload]
durations = "bimodal"
tasks = 60
"""


COMPOSE_SMALL = """
policies = ["lpt"]
runner = "compose"
[topology]
servers = 3
"""


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_example_specs_are_valid() -> None:
    assert len(EXAMPLES) >= 2
    for path in EXAMPLES:
        spec, topology = load_spec(path)
        assert spec.policies, path
        assert len(topology) >= 2


def test_the_model_runner_is_deterministic_for_a_seed() -> None:
    settings = Settings(rebalance_interval_s=0.2)
    for name in ("lpt", "count", "lab", "steal"):
        policy = get_policy(name)
        w = benchmark("bursts-varied", SERVERS, seed=4)
        one = simulate(SERVERS, w, policy, settings, seed=4).to_json()
        two = simulate(
            SERVERS, benchmark("bursts-varied", SERVERS, seed=4), policy, settings, seed=4
        )
        assert one == two.to_json(), name
        other = simulate(SERVERS, benchmark("bursts-varied", SERVERS, seed=5), policy, settings)
        assert other.makespan_s != one["makespan_s"] or other.tasks != one["tasks"]


def test_the_model_runs_every_task_and_never_beats_the_lower_bound() -> None:
    for name in benchmark_names():
        w = benchmark(name, SERVERS, seed=1, target_s=2.0)
        for policy in ("lpt", "lab"):
            r = simulate(SERVERS, w, get_policy(policy), Settings(rebalance_interval_s=0.2))
            assert r.makespan_s >= w.lower_bound(sum(SERVERS.values())) - 1e-9, (name, policy)
            assert r.tasks == w.tasks
            # every task ran: the busy timelines end idle and were busy at some point
            assert all(steps[-1][1] == 0 for steps in r.busy.values())
            assert any(k > 0 for steps in r.busy.values() for _, k in steps)


def test_without_balancing_nothing_moves_and_the_policy_matters() -> None:
    w = benchmark("skewed-fixed", SERVERS, seed=1, target_s=2.0)
    idle = simulate(SERVERS, w, get_policy("lpt"), Settings(rebalance_interval_s=0))
    busy = simulate(SERVERS, w, get_policy("lpt"), Settings(rebalance_interval_s=0.2))
    assert busy.tasks_moved > 0
    assert busy.makespan_s < idle.makespan_s


@pytest.mark.parametrize("durations", ["fixed", "varied", "heavy-tailed", "bimodal"])
@pytest.mark.parametrize("arrivals", ["initial", "bursts", "stream"])
def test_generated_workloads_have_their_shape(durations: str, arrivals: str) -> None:
    shape = Shape(arrivals=arrivals, durations=durations, tasks=80, placement="hot", hot=1)
    w = generate(shape, SERVERS, seed=2)
    assert w == generate(shape, SERVERS, seed=2)
    assert w.tasks == 80
    times = {b.at_s for b in w.batches}
    assert len(times) == {"initial": 1, "bursts": 3, "stream": 12}[arrivals]
    ds = [b.duration_s for b in w.batches for _ in range(b.count)]
    if durations == "fixed":
        assert set(ds) == {0.5}
    elif durations == "bimodal":
        assert set(ds) <= {0.2, 2.0}
    elif durations == "heavy-tailed":
        assert min(ds) >= 0.1
        assert max(ds) <= 10.0
    if arrivals == "initial":
        assert len({b.node for b in w.batches}) == 1


def test_wrong_declarations_run_other_than_declared() -> None:
    w = generate(Shape(durations="varied", tasks=50, wrong_factor=(0.5, 1.5)), SERVERS, seed=1)
    ratios = [b.run_s / b.duration_s for b in w.batches]
    assert all(0.49 <= r <= 1.51 for r in ratios)
    assert max(ratios) > 1.2
    assert min(ratios) < 0.8


def test_a_malformed_spec_lists_every_problem_at_once(tmp_path: Path) -> None:
    data = {
        "policies": ["lpt", "nope"],
        "repetitions": -2,
        "colour": "blue",
        "workload": {"tasks": -1, "durations": "lumpy"},
    }
    with pytest.raises(SpecError) as caught:
        parse_spec(data, "spec", tmp_path)
    problems = "\n".join(caught.value.problems)
    assert "colour: unknown key" in problems
    assert "unknown policy 'nope' (known: lpt, count, lab, steal" in problems
    assert "repetitions:" in problems
    assert "workload.tasks:" in problems
    assert "workload.durations:" in problems
    assert "topology: Field required" in problems
    assert len(caught.value.problems) == 6


def test_a_missing_topology_file_is_named(tmp_path: Path) -> None:
    data = {"policies": ["lpt"], "topology": {"file": "gone.json"}}
    with pytest.raises(SpecError, match=r"no such file .*gone\.json"):
        parse_spec(data, "spec", tmp_path)


def test_a_compose_spec_is_accepted_with_the_wave_plot(tmp_path: Path) -> None:
    data = {"policies": ["lpt", "lab"], "runner": "compose", "topology": {"servers": 3}}
    spec, topology = parse_spec(data, "spec", tmp_path)
    assert spec.runner == "compose"
    assert spec.policies == ("lpt", "lab")
    assert len(topology) == 3
    assert spec.wanted_figures() == ("makespan", "gantt", "imbalance", "waves")


def test_a_compose_spec_still_lists_every_problem_at_once(tmp_path: Path) -> None:
    data = {"policies": ["nope"], "runner": "compose", "repetitions": 0, "topology": {}}
    with pytest.raises(SpecError) as caught:
        parse_spec(data, "spec", tmp_path)
    problems = "\n".join(caught.value.problems)
    assert "unknown policy 'nope'" in problems
    assert "repetitions:" in problems
    assert "give either `file` or `servers`" in problems
    assert len(caught.value.problems) == 3


def test_the_compose_runner_without_docker_is_one_line_exit_2_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `docker` command to be found
    spec = write(tmp_path, COMPOSE_SMALL)
    out = tmp_path / "out"
    assert main(["experiment", str(spec), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "treewave experiment: the compose runner needs Docker: no `docker` command on PATH"
    ]
    assert captured.out == ""
    assert not out.exists(), "refused before anything ran"


def test_the_compose_runner_without_an_engine_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI here: the test above covers a missing one")
    # A real docker CLI pointed at a socket where no engine listens.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    assert main(["experiment", str(write(tmp_path, COMPOSE_SMALL))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("treewave experiment: the compose runner needs ")
    assert "Docker Compose v2 plugin" in err[0] or "running Docker engine" in err[0]


def test_the_command_refuses_a_bad_spec_with_exit_2_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(tmp_path, 'policies = ["lpt", "nope"]\nbogus = 1\n[workload]\ntasks = -5\n')
    out = tmp_path / "out"
    assert main(["experiment", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s)" in err
    for words in ("bogus: unknown key", "unknown policy 'nope'", "workload.tasks", "topology"):
        assert words in err
    assert not out.exists(), "nothing was run or written"


def test_the_command_prints_a_table_and_writes_results_and_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["experiment", str(write(tmp_path, SMALL)), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "[4/4] lab" in captured.err, "progress on stderr"
    rows = {line.split()[0]: line for line in captured.out.splitlines()[2:]}
    assert set(rows) == {"lpt", "lab"}
    assert "±" in rows["lpt"]
    raw = json.loads((out / "results.json").read_text())
    assert [(r["policy"], r["seed"]) for r in raw["runs"]] == [
        ("lpt", 3),
        ("lpt", 4),
        ("lab", 3),
        ("lab", 4),
    ]
    assert set(raw["summary"]) == {"lpt", "lab"}
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    assert {"ratio", "tasks_moved", "bytes_moved", "mean_wait_s", "imbalance_mean"} <= set(table[0])
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 3  # makespan, gantt, imbalance: the model has no waves
    assert re.search(r'(src|href)="https?:', page) is None, "self-contained, offline"


def test_a_json_spec_works_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = {
        "policies": ["steal"],
        "topology": {"servers": 3, "seed": random.Random(1).randint(0, 9)},
        "workload": {"benchmark": "zipf-fixed", "target_s": 1.0},
    }
    path = write(tmp_path, json.dumps(spec), "spec.json")
    assert main(["experiment", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("steal")


@pytest.mark.parametrize("path", MODEL_EXAMPLES, ids=lambda p: p.name)
def test_the_model_example_specs_run(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # (examples/experiment-local.toml runs in tests/integration/test_experiment_local.py)
    spec, _ = load_spec(path)
    assert main(["experiment", str(path)]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == list(spec.policies)


def test_without_matplotlib_out_is_a_one_line_error_naming_the_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    out = tmp_path / "out"
    assert main(["experiment", str(write(tmp_path, SMALL)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "treewave experiment: the report's plots need matplotlib: pip install 'treewave[plots]'"
    ]
    assert not out.exists(), "refused before anything ran"
    # The table alone needs no plotting library.
    assert main(["experiment", str(write(tmp_path, SMALL))]) == 0


def test_compose_project_names_are_valid_and_unique_per_run() -> None:
    names = {project_name("My_Policy.v2", 7) for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert re.fullmatch(r"treewave-experiment-my-policy-v2-s7-[0-9a-f]{6}", name), name


def test_published_ports_are_read_from_either_ps_format() -> None:
    rows = [
        {"Service": "s0", "Publishers": [{"TargetPort": 8000, "PublishedPort": 32768}]},
        {"Service": "balancer", "Publishers": [{"TargetPort": 7999, "PublishedPort": 40001}]},
        {"Service": "secret", "Publishers": None},
    ]
    lines = "\n".join(json.dumps(r) for r in rows)  # Compose >= 2.21: one object a line
    assert published_ports(lines) == {"s0": 32768, "balancer": 40001}
    assert published_ports(json.dumps(rows)) == {"s0": 32768, "balancer": 40001}
