"""`treewave run` reloads its topology file on SIGHUP: the supervisor's side.

An invalid file changes nothing; a valid one (sent by `treewave apply --local`, which finds
the run supervising that file and signals it) starts the added server, restarts the kept
server whose children changed (its queue intact) and hands the topology to the balancer,
whose tree then includes the new server. Removed servers, drains and kills are in
test_topology_change.py.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import clean_env, treewave_command
from tests.support.http import get_json
from tests.support.run import (
    NAMES,
    TOPOLOGY,
    RunProcess,
    cmdline,
    proc_stat,
    start_run,
    write_topology,
)


@pytest.fixture
def runs() -> Iterator[list[RunProcess]]:
    """Runs started by a test; all are stopped (and their children killed) at the end."""
    started: list[RunProcess] = []
    yield started
    for run in started:
        run.kill_everything()


def complete_tree(run: RunProcess, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    tree: dict[str, Any] = {}
    while time.monotonic() < deadline:
        tree = get_json(run.balancer_url + "/api/tree")
        if tree["complete"]:
            return tree
        time.sleep(0.2)
    raise AssertionError(f"no complete Echo: {tree}")


def test_sighup_with_an_invalid_file_changes_nothing(
    tmp_path: Path, runs: list[RunProcess]
) -> None:
    run = start_run(tmp_path)
    runs.append(run)
    run.wait_ready()
    hint = run.wait_for(r"reload\s+edit (\S+), then: kill -HUP (\d+)", 5)
    assert int(hint[2]) == run.proc.pid
    assert Path(hint[1]) == (tmp_path / "topology.json").resolve()
    pids = dict(run.servers)

    bad = copy.deepcopy(TOPOLOGY)
    bad["servers"][1]["colour"] = "red"
    bad["servers"][2]["cpus"] = 0
    write_topology(tmp_path, bad)
    mark = len(run.lines)
    os.kill(run.proc.pid, signal.SIGHUP)
    run.wait_for(r"is not a valid topology; nothing changed", 10, mark)
    run.wait_for(r"servers\[1\] \('beta'\)\.colour: unknown key", 5, mark)
    run.wait_for(r"servers\[2\] \('gamma'\)\.cpus", 5, mark)

    tree = complete_tree(run)
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(NAMES)
    for name, (_, pid) in pids.items():
        state = proc_stat(pid)
        assert state is not None, f"{name} (pid {pid}) is gone"
        assert state[0] != "Z"
    assert run.proc.poll() is None, "the supervisor stopped on SIGHUP"

    # The same file again is "unchanged".
    write_topology(tmp_path)
    mark = len(run.lines)
    os.kill(run.proc.pid, signal.SIGHUP)
    run.wait_for(r"reload: the topology is unchanged", 10, mark)


def test_sighup_starts_added_servers_and_restarts_changed_ones_keeping_their_queue(
    tmp_path: Path, runs: list[RunProcess]
) -> None:
    run = start_run(tmp_path, "--state-dir", str(tmp_path / "state"))
    runs.append(run)
    run.wait_ready()
    get_json(
        run.balancer_url + "/api/tasks", "POST", {"node": "echo", "count": 5, "duration_s": 300}
    )

    grown = copy.deepcopy(TOPOLOGY)
    grown["servers"][4]["children"] = ["zeta"]  # echo gets a child: its view changes
    grown["servers"].append({"name": "zeta", "cpus": 2, "tasks": 3})
    path = write_topology(tmp_path, grown)
    mark = len(run.lines)
    apply = subprocess.run(
        [*treewave_command(), "apply", "--local", "--topology", str(path)],
        capture_output=True, text=True, timeout=60, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert apply.returncode == 0, apply.stderr
    assert f"sent SIGHUP to treewave run (pid {run.proc.pid})" in apply.stdout, apply.stdout
    run.wait_for(r"reload: 6 servers: 1 added, 0 removed, 1 restarting", 10, mark)
    started = run.wait_for(r"server zeta started \(port (\d+), pid (\d+)\)", 20, mark)
    zeta_pid = int(started[2])
    run.seen_pids.add(zeta_pid)
    args = cmdline(zeta_pid)
    assert args[args.index("--name") + 1] == "zeta"
    snapshot = Path(args[args.index("--topology") + 1])
    assert json.loads(snapshot.read_text())["servers"][-1]["name"] == "zeta"
    restarted = run.wait_for(r"server echo restarted with its new view \(pid (\d+)\)", 20, mark)
    run.seen_pids.add(int(restarted[1]))
    run.wait_for(r"reload: the balancer adopted the new topology", 30, mark)

    state = get_json(run.balancer_url + "/api/topology")
    assert [s["name"] for s in state["topology"]["servers"]] == [*NAMES, "zeta"]
    assert state["migration"]["state"] == "steady"
    tree = complete_tree(run)
    assert sorted(n["name"] for n in tree["nodes"]) == sorted([*NAMES, "zeta"])
    echo = next(n for n in tree["nodes"] if n["name"] == "echo")
    assert echo["queued"] + echo["running"] == 5, echo  # its queue survived the restart
    assert proc_stat(zeta_pid) is not None
    assert run.proc.poll() is None
