"""A third-party policy package (examples/policy-plugin) installed into a directory of
its own, then chosen by name in `treewave experiment` run as a user runs it: the
`treewave.policies` entry point group is how it is found (nothing imports it by name)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.commands import REPO, clean_env, treewave_command

SPEC = """
name = "plugin"
policies = ["nudge", "lpt"]
[topology]
servers = 4
seed = 2
[settings]
rebalance_interval_s = 0.2
[workload]
tasks = 40
durations = "varied"
"""


def test_an_installed_plugin_policy_runs_in_an_experiment(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO / "examples" / "policy-plugin", source)  # the build leaves files
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    env = clean_env(PYTHONPATH=str(target))
    done = subprocess.run(
        [*treewave_command(), "experiment", str(spec), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"nudge", "lpt"}
    assert int(rows["nudge"][4]) > 0, "the plugin moved tasks"  # the 'moved' column
    assert (tmp_path / "out" / "report.html").is_file()

    # Without the package on the path the name is unknown: a one-line refusal, exit 2.
    done = subprocess.run(
        [*treewave_command(), "experiment", str(spec)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "unknown policy 'nudge' (known: lpt, count, lab, steal)" in done.stderr
