"""Changing the topology of a running `treewave run` without losing a task.

Real processes: `treewave run` supervises the servers and the balancer; the topology file
is edited and `SIGHUP` sent, as a user does. Tasks are long (300 s), so none completes
during a test and every submitted id must be, at the end, queued or running at exactly one
server of the final topology, with no reservation left. While a drain goes on, the
servers' task lists are sampled: no id is running at two servers, none is unknown, none
is held by a server that has already retired. Kills of the balancer, of a retiring server
and of a receiving server mid-drain are survived: each is restarted by the supervisor and
the drain resumes.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import time
import urllib.error
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import clean_env, treewave_command
from tests.support.http import get_json, get_text, http_request
from tests.support.run import (
    TOPOLOGY,
    RunProcess,
    proc_stat,
    start_run,
    write_topology,
)

TASK_S = 300.0
GRACE_S = 3.0
DRAIN_TIMEOUT_S = 90.0

BASE: dict[str, Any] = {
    **TOPOLOGY,
    "settings": {**TOPOLOGY["settings"], "drain_grace_s": GRACE_S},
}
# beta and delta leave, zeta and eta join (a rename and an addition), the rest stay.
CHANGED: dict[str, Any] = {
    "settings": BASE["settings"],
    "servers": [
        {"name": "alpha", "cpus": 2, "children": ["zeta", "gamma"]},
        {"name": "zeta", "cpus": 2, "children": ["eta"]},
        {"name": "gamma", "cpus": 2, "children": ["eta", "echo"]},
        {"name": "eta", "cpus": 1},
        {"name": "echo", "cpus": 3},
    ],
}


@pytest.fixture
def runs() -> Iterator[list[RunProcess]]:
    started: list[RunProcess] = []
    yield started
    for run in started:
        run.kill_everything()


def start(tmp_path: Path, runs: list[RunProcess], topology: dict[str, Any]) -> RunProcess:
    run = start_run(tmp_path, "--state-dir", str(tmp_path / "state"), topology=topology)
    runs.append(run)
    run.wait_ready()
    return run


def submit(run: RunProcess, node: str, count: int) -> list[str]:
    body = get_json(
        run.balancer_url + "/api/tasks",
        "POST",
        {"node": node, "count": count, "duration_s": TASK_S},
    )
    first, last = body["first_task"], body["last_task"]
    prefix = first.rsplit(".", 1)[0]
    assert last == f"{prefix}.{count - 1}"
    return [f"{prefix}.{i}" for i in range(count)]


def topology_state(run: RunProcess) -> dict[str, Any]:
    state: dict[str, Any] = get_json(run.balancer_url + "/api/topology", timeout=10)
    return state


def reload(run: RunProcess, tmp_path: Path, topology: dict[str, Any]) -> None:
    write_topology(tmp_path, topology)
    mark = len(run.lines)
    os.kill(run.proc.pid, signal.SIGHUP)
    run.wait_for(r"reload: the balancer adopted the new topology", 60, mark)


def server_ports(run: RunProcess) -> dict[str, int]:
    """Every server the supervisor runs now (the peers file is rewritten on changes)."""
    out: dict[str, int] = {}
    for line in run.lines:
        if m := _started(line):
            out[m[0]] = m[1]
    return {**{n: p for n, (p, _) in run.servers.items() if n != "balancer"}, **out}


def _started(line: str) -> tuple[str, int, int] | None:
    """(name, port, pid) of a server the supervisor started after a reload."""
    m = re.search(r"server (\S+) started \(port (\d+), pid (\d+)\)", line)
    return None if m is None else (m[1], int(m[2]), int(m[3]))


def tasks_at(port: int) -> dict[str, list[str]] | None:
    try:
        got: dict[str, list[str]] = get_json(f"http://127.0.0.1:{port}/api/tasks", timeout=5)
    except (urllib.error.URLError, OSError, ValueError):
        return None  # stopped (retired) or restarting
    return got


class Conservation:
    """Samples every server's tasks during a change; checks them strictly at the end."""

    def __init__(self, run: RunProcess, ids: set[str]) -> None:
        self.run = run
        self.ids = ids
        self.samples = 0

    def sample(self) -> None:
        running: Counter[str] = Counter()
        seen: set[str] = set()
        retired = set(topology_state(self.run)["migration"]["retired"])
        for name, port in server_ports(self.run).items():
            got = tasks_at(port)
            if got is None:
                continue
            held = got["queued"] + got["running"] + got["reserved"]
            if name in retired:
                assert not held, f"{name} retired but still holds {held}"
            running.update(got["running"])
            seen.update(held + got["completed"])
        assert not (seen - self.ids), f"unknown task ids: {sorted(seen - self.ids)[:5]}"
        twice = [t for t, n in running.items() if n > 1]
        assert not twice, f"running at two servers at once: {twice[:5]}"
        self.samples += 1

    def final(self, servers: list[str]) -> None:
        """Every id exactly once, queued or running, at the servers of the final topology."""
        where: Counter[str] = Counter()
        ports = server_ports(self.run)
        for name in servers:
            got = tasks_at(ports[name])
            assert got is not None, f"{name} does not answer"
            assert got["reserved"] == [], f"{name} keeps a reservation"
            assert got["completed"] == [], f"{name} completed a {TASK_S:.0f} s task"
            where.update(got["queued"] + got["running"])
        missing = self.ids - set(where)
        assert not missing, f"lost {len(missing)} tasks: {sorted(missing)[:5]}"
        twice = [t for t, n in where.items() if n > 1]
        assert not twice, f"duplicated: {twice[:5]}"
        assert set(where) == self.ids


def drain_until_retired(
    run: RunProcess, check: Conservation, names: set[str], timeout: float = DRAIN_TIMEOUT_S
) -> dict[str, Any]:
    """Sample until the supervisor stopped every one of `names` as retired."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check.sample()
        done = {n for n in names if f"server {n} retired" in run.output}
        state = topology_state(run)
        if done == names and state["migration"]["state"] == "steady":
            return state
        time.sleep(0.5)
    raise AssertionError(f"not retired in {timeout} s: {topology_state(run)}\n{run.output}")


def load_cluster(run: RunProcess) -> set[str]:
    ids: set[str] = set()
    for node, count in (("beta", 12), ("delta", 9), ("echo", 6), ("alpha", 4)):
        ids.update(submit(run, node, count))
    return ids


def start_draining(tmp_path: Path, runs: list[RunProcess]) -> tuple[RunProcess, Conservation]:
    """A loaded cluster just told (SIGHUP) to change from BASE to CHANGED."""
    run = start(tmp_path, runs, BASE)
    check = Conservation(run, load_cluster(run))
    reload(run, tmp_path, CHANGED)
    return run, check


def kill_until_restarted(run: RunProcess, label: str, pid: int) -> None:
    """SIGKILL one supervised process and wait until the supervisor restarted it."""
    mark = len(run.lines)
    os.kill(pid, signal.SIGKILL)
    run.wait_for(rf"{label}.*restart", 30, mark)


def finish_drain(run: RunProcess, check: Conservation) -> None:
    """Wait for beta and delta to retire, then check every task id is in one place."""
    drain_until_retired(run, check, {"beta", "delta"})
    check.final([s["name"] for s in CHANGED["servers"]])


def assert_gone(pids: list[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(proc_stat(p) is None or proc_stat(p)[0] == "Z" for p in pids):  # type: ignore[index]
            return
        time.sleep(0.2)
    raise AssertionError(f"still running: {[p for p in pids if proc_stat(p)]}")


# --- tests -----------------------------------------------------------------------------------


def test_sighup_renames_removes_and_adds_servers_without_losing_a_task(
    tmp_path: Path, runs: list[RunProcess]
) -> None:
    run = start(tmp_path, runs, BASE)
    ids = load_cluster(run)
    check = Conservation(run, ids)
    check.sample()
    old_pids = [run.servers["beta"][1], run.servers["delta"][1]]

    reload(run, tmp_path, CHANGED)
    state = topology_state(run)
    assert [s["name"] for s in state["topology"]["servers"]] == [
        s["name"] for s in CHANGED["servers"]
    ]
    assert state["migration"]["state"] == "draining"
    assert set(state["migration"]["retiring"]) == {"beta", "delta"}
    # A retiring server takes no new work (its running tasks keep it busy past the grace).
    status, body = http_request(
        "POST", run.balancer_url + "/api/tasks", {"node": "beta", "count": 1}
    )
    assert status == 409, body
    assert "retiring" in body["error"]

    state = drain_until_retired(run, check, {"beta", "delta"})
    assert check.samples >= 3
    assert set(state["migration"]["retired"]) >= {"beta", "delta"}
    moved = sum(state["migration"]["retired"][n]["moved"] for n in ("beta", "delta"))
    assert moved == 21  # 12 + 9: every task of theirs, queued or requeued after the grace
    assert_gone(old_pids)
    assert not (tmp_path / "state" / "beta.json").exists()
    check.final([s["name"] for s in CHANGED["servers"]])

    # The balancer's waves run over the new tree; the old names are unknown now.
    tree = get_json(run.balancer_url + "/api/tree")
    assert tree["complete"]
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(s["name"] for s in CHANGED["servers"])
    status, _ = http_request("POST", run.balancer_url + "/api/tasks", {"node": "beta", "count": 1})
    assert status == 404
    metrics = get_text(run.balancer_url + "/metrics", timeout=10)
    assert "treewave_migration_retired_total 2.0" in metrics
    assert "treewave_migration_draining 0.0" in metrics


def test_an_invalid_topology_is_refused_naming_every_problem(
    tmp_path: Path, runs: list[RunProcess]
) -> None:
    run = start(tmp_path, runs, BASE)
    before = topology_state(run)
    bad = copy.deepcopy(CHANGED)
    bad["servers"][1]["cpus"] = 0
    bad["servers"][3]["children"] = ["nowhere"]
    bad["servers"].append({"name": "Bad_Name", "cpus": 1})
    status, body = http_request("POST", run.balancer_url + "/api/topology", bad)
    assert status == 422, body
    text = "\n".join(body["problems"])
    assert "zeta" in text
    assert "cpus" in text
    assert "nowhere" in text
    assert "Bad_Name" in text
    status, body = http_request("POST", run.balancer_url + "/api/topology", [1, 2])
    assert status == 422, body
    status, body = http_request(
        "POST", run.balancer_url + "/api/topology", b'{"servers": [', timeout=10
    )
    assert status == 422, body
    assert body["problems"][0].startswith("malformed JSON")
    assert topology_state(run) == before
    # The current topology again: accepted, nothing changes.
    status, body = http_request("POST", run.balancer_url + "/api/topology", before["topology"])
    assert status == 200
    assert body["adopted"] is False
    assert topology_state(run) == before


def test_a_second_change_during_a_drain_brings_a_retiring_server_back(
    tmp_path: Path, runs: list[RunProcess]
) -> None:
    slow = {**BASE, "settings": {**BASE["settings"], "drain_grace_s": 600}}
    run = start(tmp_path, runs, slow)
    ids = load_cluster(run)
    check = Conservation(run, ids)
    changed = {**CHANGED, "settings": slow["settings"]}
    reload(run, tmp_path, changed)
    # beta keeps running its long tasks (grace 600 s): it is still retiring when...
    assert {"beta", "delta"} <= set(topology_state(run)["migration"]["retiring"])
    check.sample()
    # (the status page and `treewave status` show them, with what they still hold)
    page = get_text(run.balancer_url + "/", timeout=10)

    assert 'id="retiring-card" hidden' not in page
    assert 'data-server="beta"' in page
    assert 'data-server="delta"' in page
    cli = subprocess.run(
        [*treewave_command(), "status", "--balancer", run.balancer_url],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=True,
    )
    assert "draining: 2 retiring servers" in cli.stdout, cli.stdout
    assert re.search(r"^  beta +retiring: 1 running \+ \d+ queued", cli.stdout, re.M), cli.stdout
    # ...a newer topology brings beta back (as a leaf under alpha) and removes eta.
    back = copy.deepcopy(changed)
    back["servers"][0]["children"] = ["zeta", "gamma", "beta"]
    back["servers"][1]["children"] = []
    back["servers"][2]["children"] = ["echo"]
    back["servers"] = [s for s in back["servers"] if s["name"] != "eta"]
    back["servers"].append({"name": "beta", "cpus": 1})
    back["settings"] = BASE["settings"]  # delta's running tasks requeued after 3 s now
    reload(run, tmp_path, back)
    state = topology_state(run)
    assert "beta" not in state["migration"]["retiring"]
    assert "eta" in state["migration"]["retiring"] or "eta" in state["migration"]["retired"]
    state = drain_until_retired(run, check, {"delta", "eta"})
    assert "beta" not in state["migration"]["retired"]
    # beta takes work again and keeps what it still held.
    deadline = time.monotonic() + 20
    while True:
        status, body = http_request(
            "POST",
            run.balancer_url + "/api/tasks",
            {"node": "beta", "count": 1, "duration_s": TASK_S},
        )
        if status == 202 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 202, body
    check.ids.add(body["first_task"])
    check.final([s["name"] for s in back["servers"]])


def test_the_balancer_killed_mid_drain_resumes_it(tmp_path: Path, runs: list[RunProcess]) -> None:
    run, check = start_draining(tmp_path, runs)
    check.sample()
    assert (tmp_path / "state" / "balancer" / "balancer-topology.json").exists()
    kill_until_restarted(run, "balancer", run.servers["balancer"][1])
    deadline = time.monotonic() + 30
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            state = topology_state(run)
            break
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    # Back with the adopted topology and the drain (if it has not finished yet).
    assert [s["name"] for s in state["topology"]["servers"]] == [
        s["name"] for s in CHANGED["servers"]
    ]
    finish_drain(run, check)


def test_a_retiring_server_killed_mid_drain_restarts_resumes_and_retires(
    tmp_path: Path, runs: list[RunProcess]
) -> None:
    run, check = start_draining(tmp_path, runs)
    assert "beta" in topology_state(run)["migration"]["retiring"]
    kill_until_restarted(run, "beta", run.servers["beta"][1])
    finish_drain(run, check)


def test_a_receiving_server_killed_mid_drain_keeps_what_it_received(
    tmp_path: Path, runs: list[RunProcess]
) -> None:
    run, check = start_draining(tmp_path, runs)
    # zeta joins with the change and receives drained tasks: kill it once it holds some,
    # while the drain is still moving more (its transfers in flight go in doubt).
    deadline = time.monotonic() + 30
    pid = 0
    while time.monotonic() < deadline:
        started = [m for line in run.lines if (m := _started(line)) and m[0] == "zeta"]
        if started:
            port, pid = started[-1][1], started[-1][2]
            held = tasks_at(port)
            if held and any(held.get(k) for k in ("queued", "running")):
                break
        time.sleep(0.1)
    else:
        raise AssertionError(f"zeta received nothing in 30 s:\n{run.output}")
    kill_until_restarted(run, "zeta", pid)
    finish_drain(run, check)
