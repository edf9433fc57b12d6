"""The node's task store (`node.store`, SQLite) on its own: its settings, that it holds
exactly what the ledger holds after any sequence of operations, that each operation is
written in a time that does not grow with the queue (counted in rows, not timed), the
import of a JSON state file written by the previous release, and that a file it does not
own is refused with a one-line error and left untouched.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import REPO
from treewave.core.ledger import TaskLedger
from treewave.core.load import counts_histogram, duration_histogram
from treewave.core.messages import Task
from treewave.node.store import (
    StoreError,
    TaskStore,
    database_path,
    import_json_state,
    stored_cpus,
)

FIXTURE = REPO / "tests" / "fixtures" / "state-ed851fb-beta.json"
"""A state file written by the JSON-format release (tests/fixtures/README.md)."""


def comparable(ledger: TaskLedger) -> dict[str, Any]:
    """What must survive a restart: everything `to_json_data` holds, the queue as a set
    (a restart re-sorts it by the queue order; ties may come back in another order)."""
    data = ledger.to_json_data()
    data["queued"] = sorted(t["id"] for t in data["queued"])
    return data


def restored(path: Path) -> TaskLedger:
    with closing(TaskStore(path)) as store:
        return store.load_ledger("longest-first")[0]


def test_the_store_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    with closing(TaskStore(tmp_path / "a.sqlite3")) as store:
        assert store.journal_mode == "wal"
        assert store.synchronous == 2  # FULL: docs/durability.md
    with closing(TaskStore(tmp_path / "a.sqlite3")) as again:  # and when reopened
        assert again.journal_mode == "wal"
        assert again.synchronous == 2


def test_the_store_holds_what_the_ledger_holds_after_every_operation(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "s.sqlite3"
    store = TaskStore(path)
    ledger = TaskLedger(track_changes=True)
    store.write_full("start", ledger, {"held": False, "cpus": 2})
    next_id = 0
    for step in range(400):
        op = rng.choice(["submit", "start", "finish", "prepare", "settle", "deliver", "requeue"])
        if op == "submit":
            count = rng.randint(1, 4)
            durations = [rng.choice([1.0, 2.0]) for _ in range(count)]
            ledger.submit(
                [Task(id=f"t{next_id + i}", duration_s=d) for i, d in enumerate(durations)]
            )
            next_id += count
        elif op == "start":
            ledger.start_next(float(step))
        elif op == "finish" and ledger.running:
            ledger.finish(rng.choice(list(ledger.running)))
        elif op == "prepare":
            ledger.prepare(f"x{step}", "other", rng.randint(1, 3), float(step))
        elif op == "settle" and ledger.reserved:
            transfer = rng.choice(list(ledger.reserved))
            ledger.commit(transfer) if rng.random() < 0.5 else ledger.abort(transfer)
        elif op == "deliver":
            task = Task(id=f"in{step}", duration_s=1.0)
            ledger.deliver(f"in{step}", (task,)) if rng.random() < 0.7 else ledger.cancel(
                f"in{step}"
            )
        elif op == "requeue":
            ledger.requeue_running()
        if step % 3 == 0:  # several operations in one commit, as completions are grouped
            store.apply("submit", ledger.take_changes(), ledger, {"held": False, "cpus": 2})
        if step % 51 == 0:  # just applied
            assert comparable(restored(path)) == comparable(ledger), step
    store.apply("submit", ledger.take_changes(), ledger, {"held": True, "cpus": 2})
    store.close()
    assert comparable(restored(path)) == comparable(ledger)
    assert ledger.completed > 0
    assert ledger.transferred_out > 0
    assert ledger.transferred_in > 0
    with closing(TaskStore(path)) as store:
        assert store.load_flags()["held"] is True


def test_one_submission_writes_one_row_whatever_the_queue(tmp_path: Path) -> None:
    """O(change): the rows a one-task submission touches do not depend on the queue."""
    path = tmp_path / "s.sqlite3"
    store = TaskStore(path)
    ledger = TaskLedger(track_changes=True)
    ledger.submit([Task(id=f"q{i}", duration_s=1.0) for i in range(20_000)])
    store.write_full("start", ledger, {"held": False, "cpus": 1})
    ledger.submit([Task(id="one", duration_s=1.0)])
    changes = ledger.take_changes()
    assert list(changes.held) == ["one"]
    assert not changes.dropped
    before = store.db.total_changes
    store.apply("submit", changes, ledger, {"held": False, "cpus": 1})
    flags_rows = 5  # held, cpus and three counters
    assert store.db.total_changes - before == 1 + flags_rows
    store.close()


def test_a_json_state_file_of_the_previous_release_is_imported_once(tmp_path: Path) -> None:
    legacy = tmp_path / "beta.json"
    shutil.copy(FIXTURE, legacy)
    old = json.loads(FIXTURE.read_text())
    expected = TaskLedger.from_json_data(old)
    store = TaskStore(database_path(tmp_path, "beta"))
    assert store.is_empty()
    flags = import_json_state(store, legacy, "longest-first")
    store.close()
    assert flags == {"held": False, "cpus": 2}
    assert not legacy.exists()
    assert (tmp_path / "beta.json.imported").read_bytes() == FIXTURE.read_bytes()
    assert comparable(restored(database_path(tmp_path, "beta"))) == comparable(expected)
    assert stored_cpus(tmp_path, "beta") == 2


def foreign_database(path: Path) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute("INSERT INTO notes VALUES ('mine')")
        db.commit()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(b"this is not a database\n" * 100), "not an SQLite database"),
        (foreign_database, "another application"),
    ],
    ids=["garbage", "foreign-sqlite"],
)
def test_a_file_that_is_not_a_task_store_is_refused_and_left_alone(
    tmp_path: Path, make: Any, says: str
) -> None:
    path = tmp_path / "beta.sqlite3"
    make(path)
    before = path.read_bytes()
    with pytest.raises(StoreError) as err:
        TaskStore(path)
    message = str(err.value)
    assert str(path) in message
    assert says in message
    assert "\n" not in message
    assert path.read_bytes() == before
    assert not (tmp_path / "beta.sqlite3-wal").exists()


def test_the_ledger_keeps_its_queue_s_duration_counts_as_it_changes() -> None:
    """The Echo reply's histogram is read from counts the ledger keeps (no pass over a
    100,000-task queue per wave): they always match the queue."""
    rng = random.Random(3)
    ledger = TaskLedger()
    for step in range(300):
        op = rng.choice(["submit", "start", "prepare", "closest", "abort", "requeue"])
        if op == "submit":
            ledger.submit([Task(id=f"t{step}", duration_s=rng.choice([1.0, 2.5, 4.0]))])
        elif op == "start":
            ledger.start_next(float(step))
        elif op == "prepare":
            ledger.prepare(f"p{step}", "x", rng.randint(1, 3), 0.0)
        elif op == "closest":
            ledger.prepare(f"c{step}", "x", 2, 0.0, durations=(1.0, 3.0))
        elif op == "abort" and ledger.reserved:
            ledger.abort(rng.choice(list(ledger.reserved)))
        elif op == "requeue":
            ledger.requeue_running()
        assert ledger.queued_durations == Counter(t.duration_s for t in ledger.queued), step
        assert counts_histogram(ledger.queued_durations) == duration_histogram(
            t.duration_s for t in ledger.queued
        )


def test_an_empty_database_left_by_a_start_that_died_early_is_taken(tmp_path: Path) -> None:
    """A start killed after SQLite wrote the file's header but before the schema was
    committed leaves a database with nothing in it: the next start uses it."""
    path = tmp_path / "beta.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode = wal")
    assert path.stat().st_size > 0
    with closing(TaskStore(path)) as store:
        assert store.is_empty()
        assert store.journal_mode == "wal"
