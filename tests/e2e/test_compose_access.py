"""Compose published beyond loopback (issue 15): with `TREEWAVE_BIND_ADDRESS` set to a
non-loopback address of this machine, the balancer requires the API token the one-shot
`secret` service made, for every change; reads, healthchecks and Prometheus's scrapes
keep working without it.

Skipped without Docker Compose v2 (failing instead under TREEWAVE_REQUIRE_DOCKER=1), and
without a non-loopback IPv4 address on this machine (there is always one where Docker
runs: its bridge gateway).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.http import http_request
from treewave.core.topology import ServerSpec, Settings, Topology

pytestmark = pytest.mark.e2e

TOPOLOGY = Topology.from_servers(
    [
        ServerSpec(name="aurora", cpus=1, tasks=1, children=("birch", "cedar")),
        ServerSpec(name="birch", cpus=1, tasks=1),
        ServerSpec(name="cedar", cpus=1, tasks=0),
    ],
    Settings(task_time_s=600, rebalance_interval_s=0, wave_timeout_s=5),
)
"""Tasks outlast the test, so a count changes only when a request changes it."""


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine other than loopback (`hostname -I`)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for address in out.stdout.split():
        if "." in address and not address.startswith("127."):
            return address
    return None


def request(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """`http_request` with the patience a stack on a busy machine needs."""
    return http_request(method, url, body, timeout=60, headers=headers)


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    launch_stack: Any,
) -> Iterator[Any]:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to publish on")
    with launch_stack(request, tmp_path_factory, TOPOLOGY, "access", bind_address=address) as s:
        yield s


@pytest.fixture(scope="module")
def token(stack: Any) -> str:
    done = stack.compose("exec", "-T", "balancer", "cat", "/run/treewave-api/token")
    assert done.returncode == 0, done.stderr
    value: str = done.stdout.strip()
    assert len(value) >= 32
    return value


def held(stack: Any) -> dict[str, int]:
    tree = stack.wait_for("a complete Echo", stack.complete_tree, timeout=60)
    return {n["name"]: n["queued"] + n["running"] for n in tree["nodes"]}


def test_published_beyond_loopback_changes_need_the_token(stack: Any, token: str) -> None:
    assert not urllib.parse.urlsplit(stack.balancer_url).hostname.startswith("127.")
    before = held(stack)
    url = stack.balancer_url + "/api/tasks"
    body = {"node": "cedar", "count": 4}
    status, answer = request("POST", url, body)
    assert status == 401, answer
    assert answer["reason"] == "token_missing"
    status, answer = request("POST", url, body, {"Authorization": "Bearer " + "x" * 43})
    assert status == 401, answer
    assert answer["reason"] == "token_wrong"
    status, answer = request(
        "POST", url, body, {"Authorization": f"Bearer {token}", "Origin": "http://evil.example"}
    )
    assert status == 403, answer
    assert held(stack) == before

    status, answer = request("POST", url, body, {"Authorization": f"Bearer {token}"})
    assert status == 202, answer
    after = held(stack)
    assert after["cedar"] == before["cedar"] + 4


def test_the_cli_sends_the_token(stack: Any, token: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREEWAVE_")}
    command = [sys.executable, "-m", "treewave.cli.main"]
    args = ["finn", "--balancer", stack.balancer_url, "--tasks-per-node", "1"]
    before = held(stack)
    refused = subprocess.run([*command, *args], env=env, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "requires its API token" in refused.stderr
    assert held(stack) == before
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n", encoding="utf-8")
    done = subprocess.run(
        [*command, *args, "--token-file", str(token_file)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert held(stack) == {name: n + 1 for name, n in before.items()}


def test_reads_health_and_scrapes_need_no_token_but_a_known_host(stack: Any) -> None:
    status, tree = request("GET", stack.balancer_url + "/api/tree")
    assert status == 200, tree
    status, answer = request("GET", stack.balancer_url + "/api/status", headers={"Host": "x.test"})
    assert status == 421, answer
    # Compose's healthcheck (HTTP/1.0 to 127.0.0.1 inside the container) passes.
    name = stack.container("balancer")
    assert stack.health(name) == "healthy"

    # Prometheus scrapes balancer:7999 (a Host the balancer serves under).
    def scraped() -> bool | None:
        query = urllib.parse.urlencode({"query": 'up{job="treewave-balancer"}'})
        status, answer = request("GET", f"{stack.prometheus_url}/api/v1/query?{query}")
        assert status == 200, answer
        result = answer["data"]["result"]
        return True if result and result[0]["value"][1] == "1" else None

    stack.wait_for("Prometheus to scrape the balancer", scraped, timeout=60)


def test_only_the_balancer_can_read_the_token(stack: Any) -> None:
    for server in TOPOLOGY.names:
        done = stack.compose("exec", "-T", server, "ls", "/run/treewave-api/token")
        assert done.returncode != 0, f"{server} can see the API token"


def test_reads_behind_the_token_when_configured(stack: Any, token: str) -> None:
    """`TREEWAVE_TOKEN_FOR_READS=1` in the environment of `docker compose up` recreates the
    balancer with reads behind the token: the API and the page need it (or the page's
    session cookie), while the healthcheck and Prometheus's scrape keep working without.
    Put back afterwards (the balancer recreated without it)."""
    stack.env["TREEWAVE_TOKEN_FOR_READS"] = "1"
    try:
        up = stack.compose("up", "-d", "--wait", "balancer", timeout=300)
        assert up.returncode == 0, up.stderr
        name = stack.container("balancer")
        assert stack.health(name) == "healthy"
        for path in ("/api/status", "/api/tree", "/api/topology", "/api/waves"):
            status, answer = request("GET", stack.balancer_url + path)
            assert status == 401, (path, answer)
            assert answer["reason"] == "token_missing", (path, answer)
        bearer = {"Authorization": f"Bearer {token}"}
        status, answer = request("GET", stack.balancer_url + "/api/tree", None, bearer)
        assert status == 200, answer
        assert answer["complete"] is True, answer
        status, answer = request("GET", stack.balancer_url + "/healthz")
        assert status == 200, answer
        recreated_at = time.time()

        def scraped_since() -> bool | None:
            """Prometheus's latest scrape of the balancer is after the recreation, and up."""
            samples = {}
            for expr in ('up{job="treewave-balancer"}', 'timestamp(up{job="treewave-balancer"})'):
                query = urllib.parse.urlencode({"query": expr})
                status, answer = request("GET", f"{stack.prometheus_url}/api/v1/query?{query}")
                assert status == 200, answer
                result = answer["data"]["result"]
                if not result:
                    return None
                samples[expr] = float(result[0]["value"][1])
            up, at = samples.values()
            return True if at > recreated_at and up == 1 else None

        stack.wait_for("Prometheus to scrape the recreated balancer", scraped_since, timeout=90)
    finally:
        stack.env.pop("TREEWAVE_TOKEN_FOR_READS", None)
        back = stack.compose("up", "-d", "--wait", "balancer", timeout=300)
        assert back.returncode == 0, back.stderr
    status, answer = request("GET", stack.balancer_url + "/api/status")
    assert status == 200, answer
