"""The task store seen from a real `treewave node` process: a database file it does not
own stops it (exit 2, one line naming the file, nothing overwritten), and a state
directory written by the previous release (JSON) is imported with every task.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import REPO, clean_env, treewave_command
from tests.support.ports import free_port
from tests.support.run import write_topology

from .conftest import StartFaultCluster
from .support import TaskBook, drained, wait_for

FIXTURE = REPO / "tests" / "fixtures" / "state-ed851fb-beta.json"
"""`beta`'s state file as the JSON-format release wrote it (tests/fixtures/README.md)."""

TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": 0.2, "rebalance_interval_s": 0, "wave_timeout_s": 2.0},
    "servers": [
        {"name": "alpha", "cpus": 1, "tasks": 1, "children": ["beta"]},
        {"name": "beta", "cpus": 2, "tasks": 3, "children": []},
    ],
}


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 definitely not sqlite " * 200)


def foreign(path: Path) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE photos (name TEXT)")
        db.commit()


def truncated_store(path: Path) -> None:
    """A real SQLite header followed by garbage pages."""
    path.write_bytes(b"SQLite format 3\x00" + b"\x10\x00\x01\x01" + b"\xff" * 8000)


@pytest.mark.parametrize(
    "make", [garbage, foreign, truncated_store], ids=["garbage", "foreign", "corrupt"]
)
def test_a_bad_database_file_stops_the_server_and_is_left_alone(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = state / "beta.sqlite3"
    make(db)
    before = db.read_bytes()
    topology = write_topology(tmp_path, TOPOLOGY)
    result = subprocess.run(
        [
            *treewave_command(),
            "node",
            "--name",
            "beta",
            "--topology",
            str(topology),
            "--state-dir",
            str(state),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if str(db) in line]
    assert len(errors) == 1, result.stderr
    assert "task store" in errors[0]
    assert db.read_bytes() == before
    assert sorted(p.name for p in state.iterdir()) == ["beta.sqlite3"]


def test_a_server_imports_the_previous_release_s_json_state_with_every_task(
    fault_cluster: StartFaultCluster,
) -> None:
    cluster = fault_cluster(TOPOLOGY)
    book = TaskBook()
    book.add_initial(TOPOLOGY)
    wait_for("the initial tasks to finish", lambda: drained(cluster.snapshot()))
    state = cluster.directory / "state"
    cluster.kill("beta")
    for old in state.glob("beta.sqlite3*"):
        old.unlink()
    shutil.copy(FIXTURE, state / "beta.json")
    saved = json.loads(FIXTURE.read_text())
    held = {t["id"] for t in saved["queued"]}
    reserved = {t["id"] for r in saved["reserved"] for t in r["tasks"]}
    # The fixture's ids are not the ones this run's beta created: start its book afresh.
    book.created = {*held, *reserved, *saved["done_ids"], "alpha:init:1"}

    cluster.restart("beta")
    tasks = cluster.node_tasks("beta")
    assert set(tasks["completed"]) >= set(saved["done_ids"])
    assert held <= {*tasks["queued"], *tasks["running"], *tasks["completed"]}
    assert not (state / "beta.json").exists()
    assert (state / "beta.json.imported").read_bytes() == FIXTURE.read_bytes()
    assert (state / "beta.sqlite3").is_file()
    problems = book.check(cluster.snapshot())
    assert not problems, problems

    # Every imported task runs; the open reservation (to a server this cluster does not
    # have, from a balancer it does not have) stays reserved until a coordinator settles it.
    def ran() -> bool:
        return all(not t["queued"] and not t["running"] for t in cluster.snapshot().values())

    wait_for("every imported task to run", ran, timeout=90)
    final = cluster.snapshot()
    assert set(final["beta"]["completed"]) >= held | set(saved["done_ids"])
    assert final["beta"]["completed_count"] == saved["completed"] + len(held)
    assert set(final["beta"]["reserved"]) == reserved
    assert not book.check(final)

    # A restart reads the database, not the file put aside, and loses nothing. Completions
    # are committed in groups, one per tick (node.app `save_soon`: a lost one only reruns
    # its task), so wait until the last of them is in the database before the kill -9.
    def completed_in_database() -> int:
        with closing(sqlite3.connect(f"file:{state / 'beta.sqlite3'}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT value FROM flags WHERE key = 'completed'").fetchone()
        return int(row[0])

    wait_for(
        "beta's last completions committed",
        lambda: completed_in_database() == final["beta"]["completed_count"],
        timeout=30,
    )
    cluster.kill("beta")
    cluster.restart("beta")
    again = cluster.node_tasks("beta")
    assert again["completed_count"] == final["beta"]["completed_count"]
    assert set(again["reserved"]) == reserved
    assert cluster.node_state("beta")["in_doubt"] == [
        {"transfer": "t-open", "target": "gamma", "tasks": 2}
    ]
