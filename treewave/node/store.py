"""A server's tasks on disk: one SQLite database (WAL, `synchronous=FULL`) per server.

The ledger (`core.ledger.TaskLedger`) keeps the rules; this shell only writes what each
operation changed (`LedgerChanges`) as ONE transaction, committed durably before the
server acknowledges the operation, so the cost of a change does not grow with the queue.
Why these settings, and what they guarantee on a power loss: docs/durability.md.

A state directory written by the JSON format of earlier releases (`NAME.json`, the whole
ledger rewritten on every change) is imported once on start; the JSON file is then
renamed aside (`NAME.json.imported`), never deleted.

`TREEWAVE_TEST_CRASH_AT=POINT:before|after` is for tests only: read once when the store
opens, it makes the process exit hard (exit code 70) right before or right after the
commit of the operation `POINT` (one of `COMMIT_POINTS`), so tests can check that
nothing acknowledged is lost and nothing is duplicated across a crash.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

from treewave.core.ledger import LedgerChanges, QueueOrder, TaskLedger
from treewave.core.messages import Task

__all__ = [
    "COMMIT_POINTS",
    "CRASH_ENV",
    "CRASH_EXIT_CODE",
    "DB_SUFFIX",
    "SCHEMA_VERSION",
    "TRANSFER_COMMIT_POINTS",
    "CommitPoint",
    "StoreError",
    "TaskStore",
    "database_path",
    "import_json_state",
    "legacy_json_path",
    "stored_cpus",
]

log = logging.getLogger("treewave.node.store")

SCHEMA_VERSION = 1
APPLICATION_ID = 0x54574156
"""`PRAGMA application_id` of a treewave task store ("TWAV"): a database without it is
someone else's, and is left alone."""
DB_SUFFIX = ".sqlite3"
JOURNAL_MODE = "wal"
SYNCHRONOUS = "FULL"
"""Decided in docs/durability.md: in WAL mode, FULL syncs the WAL on every commit, so a
committed transaction survives a power loss; NORMAL could roll back the last ones."""
CommitPoint = Literal[
    "submit",
    "finn",
    "prepare",
    "deliver",
    "cancel",
    "commit",
    "abort",
    "drain",
    "complete",
    "import",
    "start",
]
COMMIT_POINTS: tuple[CommitPoint, ...] = get_args(CommitPoint)
"""The operations whose commit the test-only crash switch can interrupt."""
TRANSFER_COMMIT_POINTS: dict[str, CommitPoint] = {
    "transfer.prepare": "prepare",
    "transfer.deliver": "deliver",
    "transfer.cancel": "cancel",
    "transfer.commit": "commit",
    "transfer.abort": "abort",
}
"""The commit point of each transfer step a server stores (by message type)."""
CRASH_ENV = "TREEWAVE_TEST_CRASH_AT"
CRASH_EXIT_CODE = 70


SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL
);
CREATE TABLE reservations (
    transfer TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    since REAL NOT NULL,
    tasks TEXT NOT NULL
);
CREATE TABLE done (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE);
CREATE TABLE incoming (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    transfer TEXT NOT NULL UNIQUE,
    outcome TEXT NOT NULL
);
CREATE TABLE settled (seq INTEGER PRIMARY KEY AUTOINCREMENT, transfer TEXT NOT NULL UNIQUE);
CREATE TABLE flags (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
"""`tasks`: every task queued or running here (a running task runs again after a crash),
in arrival order; `reservations`: the donor side of open transfers; `done`, `incoming`,
`settled`: the ledger's bounded memories of ids; `flags`: the server's `held`, `cpus`, `drain_seq`
and the ledger's counters, as JSON values."""

COUNTERS = ("completed", "transferred_in", "transferred_out")


class StoreError(ValueError):
    """The database cannot be used (corrupt, foreign, newer schema): one line naming the
    file. A `ValueError`, so the server refuses to start with exit code 2."""


def database_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}{DB_SUFFIX}"


def legacy_json_path(state_dir: Path, name: str) -> Path:
    """Where earlier releases kept a server's whole ledger as JSON."""
    return state_dir / f"{name}.json"


def stored_cpus(state_dir: Path, name: str) -> int | None:
    """The CPU count a server last ran with, from its task store (or a JSON state file
    not yet imported); None when it has stored nothing (a server leaving the topology
    restarts with it)."""
    db = database_path(state_dir, name)
    legacy = legacy_json_path(state_dir, name)
    if db.is_file() and db.stat().st_size > 0:
        store = TaskStore(db)
        try:
            if not store.is_empty():
                return max(1, int(store.load_flags().get("cpus", 1)))
        finally:
            store.close()
    if legacy.is_file():
        try:
            return max(1, int(json.loads(legacy.read_text(encoding="utf-8")).get("cpus", 1)))
        except (OSError, ValueError, AttributeError) as exc:
            raise StoreError(f"{legacy}: cannot read the saved queue: {exc}") from None
    return None


def crash_point_from_env() -> tuple[str, str] | None:
    """The test-only crash switch, `POINT:before|after` (None when unset)."""
    text = os.environ.get(CRASH_ENV, "").strip()
    if not text:
        return None
    point, _, when = text.partition(":")
    if point not in COMMIT_POINTS or when not in ("before", "after"):
        raise ValueError(
            f"{CRASH_ENV}={text!r}: expected POINT:before|after with POINT one of "
            f"{', '.join(COMMIT_POINTS)} (a test-only switch)"
        )
    return point, when


class TaskStore:
    """One server's database. `apply` writes one operation's changes in one transaction
    (on the caller's thread: see docs/durability.md for why not a writer thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.crash_at = crash_point_from_env()
        self.db = _connect(path)
        self.commits = 0

    # --- opening ---------------------------------------------------------------------------

    @property
    def journal_mode(self) -> str:
        return str(self.db.execute("PRAGMA journal_mode").fetchone()[0])

    @property
    def synchronous(self) -> int:
        """0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA (SQLite's numbering)."""
        return int(self.db.execute("PRAGMA synchronous").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    # --- reading ---------------------------------------------------------------------------

    def is_empty(self) -> bool:
        """Whether nothing was ever stored (a new server, or one to import)."""
        return bool(self.db.execute("SELECT count(*) FROM flags").fetchone()[0] == 0)

    def load_flags(self) -> dict[str, Any]:
        """`held`, `cpus` and the ledger's counters."""
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM flags")}

    def load_data(self) -> dict[str, Any]:
        """Everything stored, in `TaskLedger.to_json_data`'s shape plus `held` and `cpus`."""
        db = self.db
        flags = self.load_flags()
        return {
            "queued": [json.loads(t) for (t,) in db.execute("SELECT task FROM tasks ORDER BY seq")],
            "reserved": [
                {"transfer": tr, "target": target, "since": since, "tasks": json.loads(tasks)}
                for tr, target, since, tasks in db.execute(
                    "SELECT transfer, target, since, tasks FROM reservations ORDER BY rowid"
                )
            ],
            "done_ids": [i for (i,) in db.execute("SELECT id FROM done ORDER BY seq")],
            "incoming": dict(db.execute("SELECT transfer, outcome FROM incoming ORDER BY seq")),
            "settled": [t for (t,) in db.execute("SELECT transfer FROM settled ORDER BY seq")],
            **flags,
        }

    def open_ledger(
        self, order: QueueOrder, initial: Callable[[], list[Task]], cpus: int
    ) -> tuple[TaskLedger, dict[str, Any]]:
        """The server's ledger and its flags (`held`, `drain_seq`): as stored; else imported from a
        JSON state file of an earlier release beside the database; else a new ledger
        with the `initial` tasks, stored before the server starts."""
        legacy = legacy_json_path(self.path.parent, self.path.name.removesuffix(DB_SUFFIX))
        if self.is_empty() and legacy.is_file():
            import_json_state(self, legacy, order)
        if not self.is_empty():
            ledger, flags = self.load_ledger(order)
            log.info(
                "restored %d queued and %d reserved tasks from %s",
                len(ledger.queued),
                ledger.reserved_count,
                self.path,
            )
            return ledger, flags
        ledger = TaskLedger(order, track_changes=True)
        ledger.submit(initial())
        flags = {"held": False, "cpus": cpus, "drain_seq": 0}
        self.write_full("start", ledger, flags)
        return ledger, flags

    def load_ledger(self, order: QueueOrder) -> tuple[TaskLedger, dict[str, Any]]:
        """The stored ledger (tracking its changes from now on) and the stored flags."""
        data = self.load_data()
        ledger = TaskLedger.from_json_data(data, order, track_changes=True)
        return ledger, {k: data[k] for k in ("held", "cpus", "drain_seq") if k in data}

    # --- writing ---------------------------------------------------------------------------

    def apply(
        self, point: CommitPoint, changes: LedgerChanges, ledger: TaskLedger, flags: dict[str, Any]
    ) -> None:
        """Write one operation's changes and the current flags and counters, as one
        transaction committed durably before returning (raises on failure: then nothing
        of it is stored, and the caller must not acknowledge)."""
        with self._transaction(point):
            self._write_changes(changes)
            self._write_flags(ledger, flags)

    def write_full(self, point: CommitPoint, ledger: TaskLedger, flags: dict[str, Any]) -> None:
        """Replace everything with `ledger` (a new server's initial tasks, an import)."""
        data = ledger.to_json_data()
        with self._transaction(point):
            for table in ("tasks", "reservations", "done", "incoming", "settled", "flags"):
                self.db.execute(f"DELETE FROM {table}")
            self.db.executemany(
                "INSERT OR IGNORE INTO tasks (id, task) VALUES (?, ?)",
                ((t["id"], json.dumps(t)) for t in data["queued"]),
            )
            self.db.executemany(
                "INSERT INTO reservations (transfer, target, since, tasks) VALUES (?, ?, ?, ?)",
                (
                    (r["transfer"], r["target"], r["since"], json.dumps(r["tasks"]))
                    for r in data["reserved"]
                ),
            )
            self.db.executemany(
                "INSERT INTO done (id) VALUES (?)", ((i,) for i in data["done_ids"])
            )
            self.db.executemany(
                "INSERT INTO incoming (transfer, outcome) VALUES (?, ?)", data["incoming"].items()
            )
            self.db.executemany(
                "INSERT INTO settled (transfer) VALUES (?)", ((t,) for t in data["settled"])
            )
            self._write_flags(ledger, flags)
        ledger.take_changes()  # all written

    @contextmanager
    def _transaction(self, point: CommitPoint) -> Iterator[None]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.rollback()
            raise
        self._maybe_crash(point, "before")
        db.commit()
        self.commits += 1
        self._maybe_crash(point, "after")

    def _write_changes(self, c: LedgerChanges) -> None:
        db = self.db
        if c.dropped:
            db.executemany("DELETE FROM tasks WHERE id = ?", ((i,) for i in c.dropped))
        if c.held:
            db.executemany(
                "INSERT INTO tasks (id, task) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                ((i, t.model_dump_json()) for i, t in c.held.items()),
            )
        if c.unreserved:
            db.executemany(
                "DELETE FROM reservations WHERE transfer = ?", ((t,) for t in c.unreserved)
            )
        if c.reserved:
            db.executemany(
                "INSERT OR REPLACE INTO reservations (transfer, target, since, tasks) "
                "VALUES (?, ?, ?, ?)",
                (
                    (
                        r.transfer,
                        r.target,
                        r.since,
                        json.dumps([t.model_dump() for t in r.tasks]),
                    )
                    for r in c.reserved.values()
                ),
            )
        _remember(db, "done", "id", c.done, c.forgotten_done)
        _remember(db, "settled", "transfer", c.settled, c.forgotten_settled)
        if c.incoming:
            db.executemany(
                "INSERT OR IGNORE INTO incoming (transfer, outcome) VALUES (?, ?)",
                c.incoming.items(),
            )
        if c.forgotten_incoming:
            db.executemany(
                "DELETE FROM incoming WHERE transfer = ?", ((t,) for t in c.forgotten_incoming)
            )

    def _write_flags(self, ledger: TaskLedger, flags: dict[str, Any]) -> None:
        values = {**{k: getattr(ledger, k) for k in COUNTERS}, **flags}
        self.db.executemany(
            "INSERT OR REPLACE INTO flags (key, value) VALUES (?, ?)",
            ((k, json.dumps(v)) for k, v in values.items()),
        )

    def _maybe_crash(self, point: str, when: str) -> None:
        if self.crash_at == (point, when):
            log.error("%s: injected crash %s the commit of %s", self.path.name, when, point)
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)


def _remember(
    db: sqlite3.Connection, table: str, column: str, new: list[str], old: list[str]
) -> None:
    if new:
        db.executemany(
            f"INSERT OR IGNORE INTO {table} ({column}) VALUES (?)",
            ((i,) for i in new),
        )
    if old:
        db.executemany(
            f"DELETE FROM {table} WHERE {column} = ?",
            ((i,) for i in old),
        )


def _connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the store at `path` with the decided settings; a file that is not
    a treewave task store raises `StoreError` and is not written to."""
    existed = path.exists() and path.stat().st_size > 0
    if existed:
        _check_header(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if existed and _holds_nothing(db):
            existed = False  # created by a start that died before the schema: nothing lost
        if existed:
            _check_existing(db, path)
        mode = db.execute(f"PRAGMA journal_mode = {JOURNAL_MODE}").fetchone()[0]
        if mode != JOURNAL_MODE:
            raise StoreError(f"{path}: cannot switch the database to WAL (journal mode {mode})")
        db.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
        if not existed:
            _create_schema(db)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"{path}: not a usable treewave task store: {exc}") from None
    except BaseException:
        db.close()
        raise
    return db


def _create_schema(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.commit()


SQLITE_HEADER = b"SQLite format 3\x00"


def _check_header(path: Path) -> None:
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the task store: {exc.strerror}") from None
    if head != SQLITE_HEADER:
        raise StoreError(f"{path}: not a treewave task store (not an SQLite database)")


def _holds_nothing(db: sqlite3.Connection) -> bool:
    """An SQLite database without a single table or index (and no application id)."""
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    return bool(app_id == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0)


def _check_existing(db: sqlite3.Connection, path: Path) -> None:
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise StoreError(
            f"{path}: not a treewave task store (an SQLite database of another application)"
        )
    check = db.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise StoreError(f"{path}: the task store is corrupt ({check})")
    row = db.execute("SELECT max(version) FROM schema_version").fetchone()
    if row is None or row[0] != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: task store schema version {row[0] if row else None}, this release "
            f"reads version {SCHEMA_VERSION}"
        )


def import_json_state(store: TaskStore, json_file: Path, order: QueueOrder) -> dict[str, Any]:
    """Import a state file of the JSON format (earlier releases) into an empty store in
    one transaction, then rename the file aside; returns the imported flags."""
    try:
        data = json.loads(json_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        ledger = TaskLedger.from_json_data(data, order)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{json_file}: cannot import the saved queue: {exc}") from None
    flags = {"held": bool(data.get("held", False)), "cpus": int(data.get("cpus", 1))}
    store.write_full("import", ledger, flags)
    aside = json_file.with_name(json_file.name + ".imported")
    json_file.rename(aside)
    _fsync_dir(json_file.parent)
    log.info(
        "imported %d queued and %d reserved tasks from %s into %s (the file is kept as %s)",
        len(ledger.queued),
        ledger.reserved_count,
        json_file,
        store.path,
        aside.name,
    )
    return flags


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
