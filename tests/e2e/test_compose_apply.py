"""Changing the topology of a Compose deployment without losing a task (issue 11).

One small stack serves the module; the tests run in file order and share it.

1. `treewave apply` with a regenerated topology that keeps some names, drops two servers
   holding long tasks and adds two new ones: it exits 0 printing
   `moved N tasks from 2 retired servers; 0 lost`; the balancer's tree is the new
   topology; the retired servers' containers and queue volumes are gone (seen through the
   Docker SDK); every task id is, exactly once, queued or running at a server of the new
   topology.
2. The plain path: render a newer topology and `docker compose up -d` (no apply). Compose
   recreates the balancer (its topology hash changed), which adopts the file's topology
   and drains the server that left (an orphan still on the network) until it is retired;
   nothing is lost.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import LaunchStack, Stack
from tests.support.commands import treewave_command
from treewave.cli.apply_cmd import NODE_TASKS
from treewave.core.topology import Topology
from treewave.generator.render import render

pytestmark = pytest.mark.e2e

TASK_S = 300.0
SETTINGS = {"task_time_s": 0.2, "rebalance_interval_s": 0, "wave_timeout_s": 5, "drain_grace_s": 2}
A = Topology.parse(
    {
        "settings": SETTINGS,
        "servers": [
            {"name": "oak", "cpus": 1, "children": ["ash", "elm"]},
            {"name": "ash", "cpus": 1},
            {"name": "elm", "cpus": 1, "children": ["fir"]},
            {"name": "fir", "cpus": 1},
        ],
    }
)
# elm and fir leave; yew and pine join; oak and ash stay.
B = Topology.parse(
    {
        "settings": SETTINGS,
        "servers": [
            {"name": "oak", "cpus": 1, "children": ["ash", "yew"]},
            {"name": "ash", "cpus": 1},
            {"name": "yew", "cpus": 2, "children": ["pine"]},
            {"name": "pine", "cpus": 1},
        ],
    }
)
# pine leaves again, under plain `docker compose up -d`.
C = Topology.parse(
    {
        "settings": SETTINGS,
        "servers": [
            {"name": "oak", "cpus": 1, "children": ["ash", "yew"]},
            {"name": "ash", "cpus": 1},
            {"name": "yew", "cpus": 2},
        ],
    }
)

IDS: set[str] = set()


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    launch_stack: LaunchStack,
) -> Iterator[Stack]:
    with launch_stack(request, tmp_path_factory, A, "apply") as stack:
        yield stack


def submit(stack: Stack, node: str, count: int) -> None:
    body = stack.post(
        stack.balancer_url + "/api/tasks",
        {"node": node, "count": count, "duration_s": TASK_S},
        expect=202,
    )
    prefix = body["first_task"].rsplit(".", 1)[0]
    IDS.update(f"{prefix}.{i}" for i in range(count))


def engine_names(stack: Stack) -> tuple[set[str], set[str]]:
    """(services with a container, volumes) of the project, from the Docker SDK."""
    label = f"com.docker.compose.project={stack.project}"
    containers = stack.engine.containers.list(all=True, filters={"label": label})
    volumes = stack.engine.volumes.list(filters={"label": label})
    return (
        {c.labels.get("com.docker.compose.service", "") for c in containers},
        {v.attrs["Labels"].get("com.docker.compose.volume", "") for v in volumes},
    )


def orphan_tasks(stack: Stack, service: str) -> dict[str, Any]:
    """`/api/tasks` of a server no longer in the compose file (Compose cannot exec in it)."""
    labels = [
        f"com.docker.compose.project={stack.project}",
        f"com.docker.compose.service={service}",
    ]
    (container,) = stack.engine.containers.list(filters={"label": labels})
    code, output = container.exec_run(["python", "-c", NODE_TASKS])
    assert code == 0, output
    tasks: dict[str, Any] = json.loads(output)
    return tasks


def conservation(stack: Stack, topology: Topology) -> None:
    where: Counter[str] = Counter()
    for name in topology.names:
        tasks = stack.node_tasks(name)
        assert tasks["reserved"] == [], f"{name} keeps a reservation"
        where.update(tasks["queued"] + tasks["running"])
    assert not (IDS - set(where)), f"lost: {sorted(IDS - set(where))[:5]}"
    assert not [t for t, n in where.items() if n > 1], "duplicated tasks"
    assert set(where) == IDS


def complete_tree_of(stack: Stack, topology: Topology) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        tree = stack.tree()
        names = sorted(n["name"] for n in tree["nodes"])
        return tree if tree["complete"] and names == sorted(topology.names) else None

    return stack.wait_for("a complete tree of the new topology", probe, 120)


def test_apply_drains_and_removes_the_servers_that_left(stack: Stack) -> None:
    for node, count in (("elm", 6), ("fir", 10), ("ash", 3)):
        submit(stack, node, count)
    (stack.directory / "topology.json").write_text(B.dumps(), encoding="utf-8")
    done = subprocess.run(
        [
            *treewave_command(),
            "apply",
            "--topology",
            str(stack.directory / "topology.json"),
            "--project",
            stack.project,
            "--balancer",
            stack.balancer_url,
            "--without",
            "grafana",
            "--timeout",
            "300",
        ],
        cwd=stack.directory,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    stack.notes.append(f"apply:\n{done.stdout}\n{done.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "moved 16 tasks from 2 retired servers; 0 lost" in done.stdout, done.stdout
    services, volumes = engine_names(stack)
    assert not services & {"elm", "fir"}, services
    assert not volumes & {"state-elm", "state-fir"}, volumes
    assert {"state-yew", "state-pine", "state-oak", "state-ash"} <= volumes
    state = stack.api("/api/topology")
    assert state["topology"] == B.to_json_data()
    assert state["migration"]["state"] == "steady"
    complete_tree_of(stack, B)
    conservation(stack, B)


def test_plain_compose_up_recreates_the_balancer_which_drains_what_left(stack: Stack) -> None:
    submit(stack, "pine", 5)
    before = stack.node_tasks("pine")  # what it holds, some of it from the first change
    held = len(before["queued"] + before["running"])
    assert held >= 5
    balancer_before = stack.docker_container(stack.container("balancer")).id
    (stack.directory / "topology.json").write_text(C.dumps(), encoding="utf-8")
    render(C, "topology.json", stack.directory)
    # What a user's plain `docker compose up -d` does to the services that exist here: every
    # server and the balancer (Grafana's image cannot be pulled on the test machines, and
    # Prometheus is not what this test is about); removed servers are left running as orphans.
    up = stack.compose("up", "-d", *C.names, "balancer", timeout=300)
    assert up.returncode == 0, up.stderr
    assert stack.docker_container(stack.container("balancer")).id != balancer_before

    def retired() -> dict[str, Any] | None:
        state: dict[str, Any] = stack.api("/api/topology")
        ok = state["migration"]["state"] == "steady" and "pine" in state["migration"]["retired"]
        return state if ok else None

    state = stack.wait_for("pine retired", retired, 180)
    assert state["migration"]["retired"]["pine"]["moved"] == held
    orphan = orphan_tasks(stack, "pine")  # still on the network, and empty
    assert orphan["queued"] + orphan["running"] + orphan["reserved"] == []
    complete_tree_of(stack, C)
    conservation(stack, C)
