"""`treewave run` as a user runs it: the console script as a real process supervising real
servers on loopback.

Every test starts its own supervisor on free ports (never fixed ones) and always cleans up:
the teardown SIGKILLs a supervisor that is still running and any child it left (there
should be none), so a failing test cannot leak processes into the next one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import clean_env, treewave_command
from tests.support.http import get_json, http_request
from tests.support.ports import free_port_block, port_free
from tests.support.run import (
    NAMES,
    TOPOLOGY,
    RunProcess,
    children_of,
    cmdline,
    proc_stat,
    start_run,
    write_topology,
)


@pytest.fixture
def treewave_run(tmp_path: Path) -> Iterator[list[RunProcess]]:
    """Start runs with `start_run` and append them here; all are killed at the end."""
    runs: list[RunProcess] = []
    yield runs
    for run in runs:
        run.kill_everything()


def assert_all_gone(run: RunProcess) -> None:
    """No process the run started exists any more, not even as a zombie (right after the
    supervisor exits: an unreaped child would still be there, reparented)."""
    left = {
        name: stat for name, (_, pid) in run.servers.items() if (stat := proc_stat(pid)) is not None
    }
    assert not left, f"processes left behind (state, parent): {left}"


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_starts_every_server_and_stops_them_all(
    tmp_path: Path, treewave_run: list[RunProcess], sig: signal.Signals
) -> None:
    base = free_port_block(len(NAMES) + 3)
    # A port in the middle of the range is taken: the servers skip it.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", base + 1))
    blocker.listen()
    try:
        run = start_run(tmp_path, base_port=base)
        treewave_run.append(run)
        run.wait_ready()
    finally:
        blocker.close()
    supervisor = run.proc.pid
    assert set(run.servers) == {*NAMES, "balancer"}
    ports = {port for port, _ in run.servers.values()}
    assert len(ports) == len(NAMES) + 1
    assert base + 1 not in ports
    assert run.servers["balancer"][0] == run.balancer_port
    assert sorted(p for n, (p, _) in run.servers.items() if n != "balancer")[0] == base
    assert f"status page  {run.balancer_url}/" in run.output
    assert f"metrics      {run.balancer_url}/metrics" in run.output

    # Echo through the real services: every server, the topology's edges, complete.
    tree = get_json(run.balancer_url + "/api/tree")
    assert tree["complete"] is True
    assert tree["missing"] == []
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(NAMES)
    assert {(e["source"], e["target"]) for e in tree["edges"]} == {
        (s["name"], c) for s in TOPOLOGY["servers"] for c in s.get("children", [])
    }

    # `ps` tells the servers apart: each child's command line names its server.
    children = children_of(supervisor)
    assert children == {pid for _, pid in run.servers.values()}
    for name, (port, pid) in run.servers.items():
        args = cmdline(pid)
        if name == "balancer":
            assert "balancer" in args
        else:
            assert args[args.index("--name") + 1] == name
            assert "node" in args
        assert args[args.index("--port") + 1] == str(port)
    logs = Path(re.search(r"logs\s+(\S+)", run.output)[1])  # type: ignore[index]
    assert logs.is_dir()

    assert run.stop(sig) == 0
    assert "stopped" in run.output
    assert_all_gone(run)
    for name, (port, _) in run.servers.items():
        assert port_free(port), f"port {port} of {name} is still open"
    assert not logs.parent.exists(), "the run directory was not removed"


def test_a_killed_server_is_reported_and_restarted_with_its_queue(
    tmp_path: Path, treewave_run: list[RunProcess]
) -> None:
    run = start_run(tmp_path, "--state-dir", str(tmp_path / "state"))
    treewave_run.append(run)
    run.wait_ready()
    _, old_pid = run.servers["delta"]
    # delta has 1 cpu: one long task runs, four wait in its queue.
    get_json(
        run.balancer_url + "/api/tasks",
        "POST",
        {"node": "delta", "count": 5, "duration_s": 120},
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = get_json(f"http://127.0.0.1:{run.servers['delta'][0]}/api/state")
        if state["running"] + state["queued"] == 5:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # let the queue reach the state file
    mark = len(run.lines)
    os.kill(old_pid, signal.SIGKILL)

    died = run.wait_for(r"server delta \(pid (\d+), port \d+\) died: killed by SIGKILL", 10, mark)
    assert int(died[1]) == old_pid
    restarted = run.wait_for(r"server delta restarted \(pid (\d+)\)", 20, mark)
    new_pid = int(restarted[1])
    assert new_pid != old_pid
    run.seen_pids.add(new_pid)
    run.wait_for(r"server delta is healthy again", 30, mark)
    args = cmdline(new_pid)
    assert args[args.index("--name") + 1] == "delta"

    deadline = time.monotonic() + 30
    tree: dict[str, Any] = {}
    while time.monotonic() < deadline:
        tree = get_json(run.balancer_url + "/api/tree")
        if tree["complete"]:
            break
        time.sleep(0.2)
    assert tree["complete"] is True, tree
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(NAMES)
    delta = next(n for n in tree["nodes"] if n["name"] == "delta")
    # The queued tasks survived in the state directory. (A task that was running when the
    # process was killed may come back queued or be lost, by the server's design.)
    assert delta["queued"] + delta["running"] >= 4, delta

    run.servers["delta"] = (run.servers["delta"][0], new_pid)
    assert run.stop(signal.SIGINT) == 0
    assert_all_gone(run)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_children_die_with_a_sigkilled_supervisor(
    tmp_path: Path, treewave_run: list[RunProcess]
) -> None:
    run = start_run(tmp_path)
    treewave_run.append(run)
    run.wait_ready()
    pids = {pid for _, pid in run.servers.values()}
    run.proc.kill()
    run.proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = {p for p in pids if (s := proc_stat(p)) is not None and s[0] != "Z"}
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, f"children outlived their supervisor: {alive}"
    # Its run directory stays behind (nothing ran to remove it); the next run sweeps it.
    logs = re.search(r"logs\s+(\S+)", run.output)
    assert logs is not None
    stale = Path(logs[1]).parent
    assert (stale / "supervisor.pid").is_file()
    subprocess.run(
        [*treewave_command(), "run", "--topology", str(tmp_path / "nope.json")],
        capture_output=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    if stale.exists():
        shutil.rmtree(stale, ignore_errors=True)
        pytest.fail(f"the stale run directory {stale} was not swept")


def test_a_bad_topology_lists_every_problem_and_starts_nothing(tmp_path: Path) -> None:
    bad = {
        "servers": [
            {"name": "alpha", "cpus": 0, "children": ["ghost"]},
            {"name": "Beta", "cpus": 1},
        ]
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad), encoding="utf-8")
    result = subprocess.run(
        [*treewave_command(), "run", "--topology", str(path), "--port", "1"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"treewave run: {path} is not a valid topology:"
    assert len(lines) >= 2
    assert any("cpus" in line for line in lines[1:])
    assert "Traceback" not in result.stderr
    missing = subprocess.run(
        [*treewave_command(), "run", "--topology", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert missing.returncode == 2
    assert "cannot read the file" in missing.stderr


def test_a_busy_balancer_port_is_one_clear_error(tmp_path: Path) -> None:
    topology = write_topology(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [*treewave_command(), "run", "--topology", str(topology), "--port", str(port)],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"treewave run: port {port} on 127.0.0.1 is already in use (another treewave run?); "
        "choose another with --port"
    )


def test_usage_errors_exit_2_and_help_has_an_example() -> None:
    bad = subprocess.run(
        [*treewave_command(), "run", "--port", "70000"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert bad.returncode == 2
    assert "not a port" in bad.stderr
    helped = subprocess.run(
        [*treewave_command(), "run", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert helped.returncode == 0
    assert "treewave run --topology" in helped.stdout


def test_token_for_reads_makes_a_run_token_the_supervisor_uses(
    tmp_path: Path, treewave_run: list[RunProcess]
) -> None:
    run = start_run(tmp_path, "--token-for-reads")
    treewave_run.append(run)
    run.wait_ready()  # the supervisor's own Echo went through with the token
    token_file = Path(run.wait_for(r"^\s+API token\s+(\S+)", 5)[1])
    token = token_file.read_text(encoding="utf-8").strip()
    assert len(token) >= 32
    assert f"--token-file {token_file}" in run.output
    status, body = http_request("GET", run.balancer_url + "/api/status")
    assert status == 401, body
    assert body["reason"] == "token_missing"
    status, body = http_request("GET", run.balancer_url + "/api/status", token=token)
    assert status == 200, body
    args = cmdline(run.servers["balancer"][1])
    assert "--token-for-reads" in args
    assert args[args.index("--api-token-file") + 1] == str(token_file)

    # A reload posts the new topology with the token, and polls it with the token.
    grown = json.loads(json.dumps(TOPOLOGY))
    grown["servers"][4]["children"] = ["zeta"]
    grown["servers"].append({"name": "zeta", "cpus": 1})
    write_topology(tmp_path, grown)
    mark = len(run.lines)
    os.kill(run.proc.pid, signal.SIGHUP)
    zeta = run.wait_for(r"server zeta started \(port (\d+), pid (\d+)\)", 20, mark)
    run.seen_pids.add(int(zeta[2]))
    restarted = run.wait_for(r"server echo restarted with its new view \(pid (\d+)\)", 20, mark)
    run.seen_pids.add(int(restarted[1]))
    run.wait_for(r"reload: the balancer adopted the new topology", 30, mark)
    status, body = http_request("GET", run.balancer_url + "/api/topology", token=token)
    assert status == 200, body
    assert [s["name"] for s in body["topology"]["servers"]] == [*NAMES, "zeta"]
    assert run.stop(signal.SIGINT) == 0
    assert not token_file.exists(), "the run's token outlived the run"
