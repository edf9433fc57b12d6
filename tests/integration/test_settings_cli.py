"""Settings as users give them, through the real console script: one validation per
setting whatever its source (flag or TREEWAVE_* variable), one line naming the setting
and the source, exit code 2, and one precedence rule (flag > environment > topology file
> default), seen in what a running balancer reports."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import clean_env, treewave_command
from tests.support.http import get_json
from tests.support.ports import free_port
from tests.support.waiting import wait_for

TOPOLOGY: dict[str, Any] = {
    "settings": {"rebalance_interval_s": 30, "wave_timeout_s": 4},
    "servers": [{"name": "alpha", "cpus": 1}],
}


def treewave(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*treewave_command(), *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def topology(tmp_path: Path) -> Path:
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(TOPOLOGY), encoding="utf-8")
    return path


def one_line_usage_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"treewave {command}: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("command", "variable", "value", "words"),
    [
        ("balancer", "TREEWAVE_WAVE_TIMEOUT_S", "abc", "'abc' is not a number"),
        ("balancer", "TREEWAVE_WAVE_TIMEOUT_S", "0", "greater than 0"),
        ("run", "TREEWAVE_WAVE_TIMEOUT_S", "-1", "greater than 0"),
        ("balancer", "TREEWAVE_REBALANCE_S", "soon", "'soon' is not a number"),
        ("run", "TREEWAVE_REBALANCE_S", "-5", "greater than or equal to 0"),
        ("balancer", "TREEWAVE_STATUS_INTERVAL_S", "0.5", "at least 1"),
        ("balancer", "TREEWAVE_PORT", "http", "not a port number"),
        ("node", "TREEWAVE_PORT", "99999", "not a port"),
        ("run", "TREEWAVE_LOG_LEVEL", "chatty", "not one of DEBUG"),
        ("node", "TREEWAVE_PEER_URL_TEMPLATE", "http://x/ws", "{name}"),
        ("status", "TREEWAVE_BALANCER", "ftp://x", "not an http(s) URL"),
        ("balancer", "TREEWAVE_POLICY", "nope", "unknown policy 'nope' (known: lpt"),
        ("run", "TREEWAVE_POLICY", "fifo", "unknown policy 'fifo' (known: lpt"),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_it(
    command: str, variable: str, value: str, words: str, topology: Path
) -> None:
    args = ["--name", "alpha"] if command == "node" else []
    if command != "status":
        args += ["--topology", str(topology)]
    line = one_line_usage_error(treewave(command, *args, **{variable: value}), command)
    assert f"{variable} (environment, for --" in line
    assert words in line


@pytest.mark.parametrize("command", ["balancer", "run"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "601"])
def test_wave_timeout_flag_gets_the_topology_files_bounds_in_every_command(
    command: str, value: str, topology: Path
) -> None:
    result = treewave(command, "--topology", str(topology), "--wave-timeout", value)
    assert result.returncode == 2
    assert "argument --wave-timeout:" in result.stderr
    assert "Traceback" not in result.stderr
    # The same value in the topology file is refused too.
    bad = json.loads(topology.read_text())
    bad["settings"]["wave_timeout_s"] = float(value)
    topology.write_text(json.dumps(bad))
    refused = treewave(command, "--topology", str(topology))
    assert refused.returncode == 2
    assert "settings.wave_timeout_s" in refused.stderr


@pytest.mark.parametrize("command", ["balancer", "run"])
def test_an_unknown_policy_flag_or_file_setting_names_the_known_ones(
    command: str, topology: Path
) -> None:
    result = treewave(command, "--topology", str(topology), "--policy", "nope")
    assert result.returncode == 2
    assert "argument --policy: unknown policy 'nope' (known: lpt" in result.stderr
    assert "Traceback" not in result.stderr
    bad = json.loads(topology.read_text())
    bad["settings"]["policy"] = "nope"
    topology.write_text(json.dumps(bad))
    refused = treewave(command, "--topology", str(topology))
    assert refused.returncode == 2
    assert "settings.policy" in refused.stderr
    assert "unknown policy 'nope' (known: lpt" in refused.stderr


def test_an_unrelated_bad_variable_does_not_break_other_commands() -> None:
    # `status` takes no wave timeout: it neither reads nor trips over the variable
    # (it used to crash every command while the parser was built).
    result = treewave(
        "status", "--balancer", f"http://127.0.0.1:{free_port()}", TREEWAVE_WAVE_TIMEOUT_S="abc"
    )
    assert result.returncode == 1
    assert "cannot reach the balancer" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_topology_reports_every_problem_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "settings": {"wave_timeout_s": 0},
                "servers": [
                    {"name": "alpha", "cpus": 0, "children": ["beta", "ghost"]},
                    {"name": "beta", "cpus": 1, "children": ["alpha"]},
                ],
            }
        )
    )
    for command in ("balancer", "render", "run"):
        result = treewave(command, "--topology", str(path))
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[0] == f"treewave {command}: {path} is not a valid topology:"
        text = "\n".join(lines[1:])
        for words in ("settings.wave_timeout_s", "cpus", "unknown child 'ghost'", "cycle"):
            assert words in text, (command, words, text)


@pytest.fixture
def balancer(topology: Path) -> Iterator[Any]:
    """Start `treewave balancer` (no server needs to run: it only has to report its
    settings) with given flags and environment; stopped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*flags: str, **env: str) -> dict[str, Any]:
        port = free_port()
        proc = subprocess.Popen(
            [
                *treewave_command(),
                "balancer",
                "--topology",
                str(topology),
                "--port",
                str(port),
                *flags,
            ],
            env=clean_env(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)

        def status() -> dict[str, Any] | None:
            assert proc.poll() is None, "the balancer exited"
            result: dict[str, Any] = get_json(f"http://127.0.0.1:{port}/api/status", timeout=5)
            return result

        return wait_for("the balancer's status", status, timeout=30)

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_precedence_flag_then_environment_then_topology_file(balancer: Any) -> None:
    assert balancer()["rebalance_interval_s"] == 30  # the topology file's
    assert balancer(TREEWAVE_REBALANCE_S="20")["rebalance_interval_s"] == 20
    flag = balancer("--rebalance-interval", "10", TREEWAVE_REBALANCE_S="20")
    assert flag["rebalance_interval_s"] == 10
