"""`treewave experiment` on the `local` runner with the repository's example spec
(examples/experiment-local.toml): two policies, each on a real `treewave run` cluster
(every server a process, real WebSockets), chosen through `settings.policy` in the
topology file the cluster runs."""

from __future__ import annotations

from pathlib import Path

from tests.support.commands import REPO
from treewave.experiment.report import write_outputs
from treewave.experiment.run import run_experiment
from treewave.experiment.spec import load_spec


def test_two_policies_on_local_clusters(tmp_path: Path) -> None:
    spec, topology = load_spec(REPO / "examples" / "experiment-local.toml")
    assert spec.runner == "local"
    assert spec.policies == ("lpt", "lab")
    lines: list[str] = []
    results = run_experiment(spec, topology, lines.append, logs=tmp_path)
    assert [r.policy for r in results] == ["lpt", "lab"]
    for r in results:
        assert r.runner == "local"
        assert r.tasks > 0
        assert r.makespan_s >= r.lower_bound_s
        assert r.tasks_moved > 0, "all the work landed on one server: some must move"
        assert sum(k for _, k in r.wave_latency_buckets) > 0, "waves ran and were timed"
        assert any(k > 0 for steps in r.busy.values() for _, k in steps)
        # The balancer itself says which policy it ran (GET /api/status); the runner
        # refuses a run where it differs, so this holds for every result it returns.
        assert r.reported_policy == r.policy
    assert sum("starting a local cluster" in line for line in lines) == 2
    paths = write_outputs(tmp_path / "out", spec, results)
    page = paths[-1].read_text()
    assert page.count("<svg") == 4  # makespan, gantt, imbalance and wave latencies
