"""A topology change that changes the settings or the tree's size takes effect at once.

Real processes (`treewave run`): the topology is posted to the balancer, or the file
edited and SIGHUP sent. `GET /api/status` must report the new wave deadline and
rebalancing interval as soon as the change is adopted, and the next waves and rounds must
run under them: a wave with a frozen server ends by the new deadline, and periodic
rounds start once the interval turns them on.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.http import get_json, get_text, http_request
from tests.support.run import TOPOLOGY, RunProcess, start_run, write_topology
from treewave.core.deadlines import wave_deadline_s
from treewave.core.topology import Topology


@pytest.fixture
def run(tmp_path: Path) -> Iterator[RunProcess]:
    started = start_run(tmp_path, rebalance_interval=None)  # the file decides
    try:
        started.wait_ready()
        yield started
    finally:
        started.kill_everything()


def with_settings(**settings: Any) -> dict[str, Any]:
    return {**TOPOLOGY, "settings": {**TOPOLOGY["settings"], **settings}}


def status(run: RunProcess) -> dict[str, Any]:
    body: dict[str, Any] = get_json(run.balancer_url + "/api/status", timeout=10)
    return body


def rounds_run(run: RunProcess) -> float:
    text = get_text(run.balancer_url + "/metrics")
    m = re.search(r"^treewave_rebalance_runs_total (\S+)$", text, re.M)
    assert m is not None, "no rebalance_runs metric"
    return float(m[1])


def test_posted_settings_change_status_waves_and_rounds_at_once(run: RunProcess) -> None:
    before = status(run)
    assert before["wave_deadline_s"] == 10.0
    assert before["rebalance_interval_s"] == 0
    assert before["policy"] == "lpt"
    metrics = get_text(run.balancer_url + "/metrics")
    assert 'treewave_balancer_policy_info{policy="lpt"} 1.0' in metrics

    answer = get_json(
        run.balancer_url + "/api/topology",
        "POST",
        with_settings(wave_timeout_s=3, rebalance_interval_s=1),
    )
    assert answer["adopted"] is True
    after = status(run)
    assert after["wave_deadline_s"] == 3.0
    assert after["rebalance_interval_s"] == 1.0

    # The next wave runs under the new deadline: with a server frozen, it ends (partial)
    # within 3 s, not the 10 s of before.
    _, pid = run.servers["echo"]
    os.kill(pid, signal.SIGSTOP)
    try:
        tree = get_json(run.balancer_url + "/api/tree", timeout=15)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert tree["complete"] is False
    assert tree["duration_s"] <= 3.0 + 0.5

    # Periodic rounds were off; the new interval turns them on.
    deadline = time.monotonic() + 15
    while rounds_run(run) < 2:
        assert time.monotonic() < deadline, "no periodic rounds after the interval changed"
        time.sleep(0.25)


def test_growing_the_tree_grows_the_deadline_in_status(run: RunProcess) -> None:
    grown = with_settings(wave_timeout_s=1)
    extra = [{"name": f"x{i}", "cpus": 1} for i in range(40)]
    grown["servers"] = [
        *TOPOLOGY["servers"][:-1],
        {**TOPOLOGY["servers"][-1], "children": [e["name"] for e in extra]},
        *extra,
    ]
    get_json(run.balancer_url + "/api/topology", "POST", grown)
    topo = Topology.parse(grown)
    expected = wave_deadline_s(1.0, topo.depth, len(topo.servers))
    assert expected > 1.0  # the tree's size, not the setting, decides
    assert status(run)["wave_deadline_s"] == round(expected, 3)


def test_an_unknown_policy_is_refused_with_the_known_ones(run: RunProcess) -> None:
    code, body = http_request(
        "POST", run.balancer_url + "/api/topology", with_settings(policy="nope")
    )
    assert code == 422
    assert "unknown policy 'nope' (known: lpt" in body["error"]
    assert status(run)["policy"] == "lpt"


def test_sighup_with_new_settings_changes_status(tmp_path: Path, run: RunProcess) -> None:
    write_topology(tmp_path, with_settings(wave_timeout_s=9, rebalance_interval_s=2))
    mark = len(run.lines)
    os.kill(run.proc.pid, signal.SIGHUP)
    run.wait_for(r"reload", 60, mark)
    deadline = time.monotonic() + 20
    while (got := status(run))["wave_deadline_s"] != 9.0:
        assert time.monotonic() < deadline, f"status still {got['wave_deadline_s']}"
        time.sleep(0.25)
    assert got["rebalance_interval_s"] == 2.0
