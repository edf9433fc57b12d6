"""`treewave experiment` on the `compose` runner, for real: the repository's example spec
(examples/experiment-compose.toml: two policies, one seed, four servers) runs each policy
on a Compose stack of its own, rendered by treewave's generator, and leaves nothing behind,
also when it is interrupted.

Skipped when Docker Compose v2 is missing, unless TREEWAVE_REQUIRE_DOCKER=1 (CI) makes that
a failure.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import REPO
from treewave.cli.main import main

# The Docker SDK, imported by name (mypy would resolve `import docker` to docker/).
docker: Any = importlib.import_module("docker")

pytestmark = pytest.mark.e2e

SPEC = REPO / "examples" / "experiment-compose.toml"
PROJECT = re.compile(r"^bringing (?P<project>treewave-experiment-\S+) up ")


def leftovers(project: str) -> dict[str, list[str]]:
    """Every container, network and volume Docker still has of Compose project `project`."""
    engine = docker.from_env()
    label = {"label": f"com.docker.compose.project={project}"}
    try:
        return {
            "containers": [c.name for c in engine.containers.list(all=True, filters=label)],
            "networks": [n.name for n in engine.networks.list(filters=label)],
            "volumes": [v.name for v in engine.volumes.list(filters=label)],
        }
    finally:
        engine.close()


def purge(project: str) -> None:
    """Force-remove whatever a failed test left of `project` (containers first)."""
    engine = docker.from_env()
    label = {"label": f"com.docker.compose.project={project}"}
    try:
        for c in engine.containers.list(all=True, filters=label):
            c.remove(force=True, v=True)
        for n in engine.networks.list(filters=label):
            n.remove()
        for v in engine.volumes.list(filters=label):
            v.remove(force=True)
    finally:
        engine.close()


def test_two_policies_each_on_a_compose_stack_of_their_own(
    require_compose: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["experiment", str(SPEC), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err

    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["policy"] for r in runs] == ["lpt", "lab"]
    for r in runs:
        assert r["runner"] == "compose"
        assert r["reported_policy"] == r["policy"], "the stack's balancer ran its policy"
        assert r["tasks"] > 0
        assert r["completed"] == r["tasks"], "every task done, exactly once"
        assert r["makespan_s"] >= r["lower_bound_s"]
        assert r["tasks_moved"] > 0, "all the work landed on one server: some must move"
        assert sum(k for _, k in r["wave_latency_buckets"]) > 0, "waves ran and were timed"
        assert set(r["busy"]) == set(r["cpus"])
        assert len(r["cpus"]) == 4
        assert any(k > 0 for steps in r["busy"].values() for _, k in steps)
    projects = [r["compose_project"] for r in runs]
    assert len(set(projects)) == 2, "a fresh stack per run"

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["policy"], row["runner"]) for row in rows] == [
        ("lpt", "compose"),
        ("lab", "compose"),
    ]
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 4  # makespan, gantt, imbalance and wave latencies
    assert [line.split()[0] for line in captured.out.splitlines()[2:]] == ["lpt", "lab"]
    assert sorted(path.name for path in out.glob("*.log")) == [
        "compose-lab-seed1.log",
        "compose-lpt-seed1.log",
    ]

    progress = captured.err.splitlines()
    assert sum(line.startswith("building the image") for line in progress) == 1
    assert [m["project"] for line in progress if (m := PROJECT.match(line))] == projects
    assert sum(line.startswith("taking ") for line in progress) == 2
    for project in projects:
        assert leftovers(project) == {"containers": [], "networks": [], "volumes": []}


def test_ctrl_c_while_a_stack_comes_up_takes_it_down(require_compose: None) -> None:
    # Ctrl-C in a terminal reaches the whole foreground process group: `treewave
    # experiment` and the `docker compose up` it runs.
    proc = subprocess.Popen(
        [sys.executable, "-m", "treewave.cli.main", "experiment", str(SPEC)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    project = None
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if m := PROJECT.match(line):
                project = m["project"]
                time.sleep(2)  # into `docker compose up`: containers are being created
                os.killpg(proc.pid, signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += rest.splitlines()
    assert project is not None, "\n".join(lines)
    left = leftovers(project)
    purge(project)
    assert proc.returncode == 130, "\n".join(lines)
    assert any(line.startswith(f"taking {project} down") for line in lines), "\n".join(lines)
    assert left == {"containers": [], "networks": [], "volumes": []}
