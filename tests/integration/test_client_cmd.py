"""`treewave status`, `submit`, `finn` and `rebalance` against a real `treewave run` cluster
(one for the module), run as the console script a user types."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import clean_env, sigint_as_in_a_terminal, treewave_command
from tests.support.http import get_json
from tests.support.ports import free_port_block
from tests.support.run import NAMES, RunProcess, start_run

LONG_S = 300
"""Tasks that outlive the test, so counts only change when a test changes them."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunProcess]:
    run = start_run(tmp_path_factory.mktemp("cluster"))
    try:
        run.wait_ready()
        yield run
    finally:
        run.kill_everything()


def treewave(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*treewave_command(), *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def loads(run: RunProcess) -> dict[str, dict[str, Any]]:
    """Every server's load from a complete Echo wave (retried: on a loaded host a link may
    be re-dialling for a moment)."""
    deadline = time.monotonic() + 30
    while True:
        tree = get_json(run.balancer_url + "/api/tree")
        if tree["complete"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert tree["complete"], tree
    return {n["name"]: n for n in tree["nodes"]}


def work(node: dict[str, Any]) -> int:
    return int(node["running"]) + int(node["queued"])


def unused_url() -> str:
    return f"http://127.0.0.1:{free_port_block(1)}"


# --- status ----------------------------------------------------------------------------------


def test_status_draws_every_server_and_a_summary(cluster: RunProcess) -> None:
    result = treewave("status", "--balancer", cluster.balancer_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("alpha ")
    for name in NAMES:
        assert any(f" {name} " in f" {line}" and "[" in line for line in lines), name
    # delta has two parents (beta, gamma): drawn once, referenced once.
    assert sum("(also under gamma)" in line for line in lines) == 1
    assert sum("↑ delta" in line for line in lines) == 1
    summary = lines[-1]
    assert summary.startswith(f"{len(NAMES)} servers · ")
    assert "imbalance" in summary
    assert "complete" in summary
    assert summary.endswith(" · policy lpt")  # the policy in force
    assert "\x1b[" not in result.stdout  # no colour when not on a terminal


def test_status_json_is_the_api_tree(cluster: RunProcess) -> None:
    result = treewave("status", "--json", "--balancer", cluster.balancer_url)
    assert result.returncode == 0, result.stderr
    tree = json.loads(result.stdout)
    assert tree["complete"] is True
    assert sorted(n["name"] for n in tree["nodes"]) == sorted(NAMES)
    assert {"source", "target"} <= set(tree["edges"][0])
    assert tree["policy"] == "lpt"


def test_status_uses_the_environment_variable(cluster: RunProcess) -> None:
    env = {**clean_env(), "TREEWAVE_BALANCER": cluster.balancer_url}
    result = treewave("status", env=env)
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout.splitlines()[-1]


def test_status_watch_refreshes_until_ctrl_c(cluster: RunProcess) -> None:
    proc = subprocess.Popen(
        [*treewave_command(), "status", "--watch", "0.3", "--balancer", cluster.balancer_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=clean_env(),
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        assert proc.stdout is not None
        headers = 0
        for line in proc.stdout:
            if "(Ctrl-C to stop)" in line:
                headers += 1
                if headers == 3:
                    break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert headers == 3
    assert proc.returncode == 0, err
    assert "Traceback" not in err


# --- submit, finn, rebalance ---------------------------------------------------------------


def test_submit_queues_tasks_on_one_server(cluster: RunProcess) -> None:
    before = loads(cluster)
    result = treewave(
        "submit",
        "--node",
        "echo",
        "--count",
        "4",
        "--duration",
        str(LONG_S),
        "--balancer",
        cluster.balancer_url,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("queued 4 tasks on echo (")
    after = loads(cluster)
    assert work(after["echo"]) == work(before["echo"]) + 4
    status = treewave("status", "--balancer", cluster.balancer_url).stdout
    echo_line = next(line for line in status.splitlines() if "─ echo " in line)
    assert f"/ {after['echo']['cpus']} cpus" in echo_line
    assert "█" in echo_line


def test_finn_gives_every_server_k_tasks(cluster: RunProcess) -> None:
    before = loads(cluster)
    result = treewave(
        "finn",
        "--tasks-per-node",
        "2",
        "--duration",
        str(LONG_S),
        "--balancer",
        cluster.balancer_url,
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("finn wave ")
    assert f": complete, {len(NAMES)} servers decided, 2 tasks each ({2 * len(NAMES)} queued)" in (
        line
    )
    after = loads(cluster)
    for name in NAMES:
        assert work(after[name]) == work(before[name]) + 2, name


def test_rebalance_reports_the_moves(cluster: RunProcess) -> None:
    submitted = treewave(
        "submit",
        "--node",
        "delta",
        "--count",
        "30",
        "--duration",
        str(LONG_S),
        "--balancer",
        cluster.balancer_url,
    )
    assert submitted.returncode == 0, submitted.stderr
    total_before = sum(work(n) for n in loads(cluster).values())
    result = treewave("rebalance", "--balancer", cluster.balancer_url)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("moved "), result.stdout
    pressures = first.rsplit("max pressure ", 1)[1].split(" s/cpu")[0]
    before, after = (float(x) for x in pressures.split(" -> "))
    assert "expected makespan" in first
    assert after < before
    assert any(line.strip().startswith("delta -> ") for line in result.stdout.splitlines()[1:])
    assert sum(work(n) for n in loads(cluster).values()) == total_before


# --- failures -------------------------------------------------------------------------------------


def test_an_unknown_server_is_the_servers_error_in_one_line(cluster: RunProcess) -> None:
    result = treewave(
        "submit", "--node", "ghost", "--count", "1", "--balancer", cluster.balancer_url
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "treewave submit: unknown server 'ghost'\n"


def test_a_value_the_balancer_rejects_is_its_error_in_one_line(cluster: RunProcess) -> None:
    result = treewave("finn", "--tasks-per-node", "999999", "--balancer", cluster.balancer_url)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("treewave finn: ")
    assert "tasks_per_node" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["submit", "--node", "alpha", "--count", "1"],
        ["finn"],
        ["rebalance"],
    ],
    ids=lambda a: "-".join(a[:2]),
)
def test_no_balancer_is_one_clear_line(args: list[str]) -> None:
    url = unused_url()
    result = treewave(*args, "--balancer", url)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"treewave {args[0]}: cannot reach the balancer at {url}: ")


def test_usage_errors_exit_2() -> None:
    for args in (
        ["submit", "--node", "alpha", "--count", "0"],
        ["submit", "--count", "1"],
        ["finn", "--tasks-per-node", "-1"],
        ["status", "--balancer", "ftp://example"],
        ["status", "--watch", "0"],
    ):
        result = treewave(*args)
        assert result.returncode == 2, args
        assert "usage:" in result.stderr


@pytest.mark.parametrize("command", ["status", "submit", "finn", "rebalance"])
def test_every_command_has_help_with_an_example(command: str, tmp_path: Path) -> None:
    result = treewave(command, "--help")
    assert result.returncode == 0
    assert "example" in result.stdout
    assert f"treewave {command}" in result.stdout.split("example", 1)[1]
    assert "--balancer URL" in result.stdout
