"""The run directory of a `treewave run`: where it lives, what it records so other
commands can find the run (its pid, the topology file it reloads), and the removal of
those left by supervisors that were killed."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "PID_FILE",
    "RUN_DIR_PREFIX",
    "TOPOLOGY_PATH_FILE",
    "find_run",
    "make_run_dir",
    "sweep_stale_run_dirs",
]

RUN_DIR_PREFIX = "treewave-run-"
PID_FILE = "supervisor.pid"
TOPOLOGY_PATH_FILE = "topology-path"
"""Holds the topology file a run reloads on SIGHUP (how `treewave apply --local` finds it)."""


def make_run_dir() -> Path:
    """A fresh run directory recording this process as its supervisor."""
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    (run_dir / PID_FILE).write_text(f"{os.getpid()}\n", encoding="utf-8")
    return run_dir


def _run_dirs() -> Iterator[tuple[Path, int]]:
    """Every run directory with its recorded supervisor pid."""
    for path in Path(tempfile.gettempdir()).glob(RUN_DIR_PREFIX + "*"):
        try:
            yield path, int((path / PID_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours, or still being set up


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's live process
    return True


def sweep_stale_run_dirs() -> None:
    """Remove run directories left by supervisors that were killed (SIGKILL cannot be
    caught, so they could not clean up): only those whose recorded supervisor is gone."""
    for path, pid in _run_dirs():
        if not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def find_run(topology_path: Path) -> int | None:
    """The pid of a live `treewave run` reloading `topology_path`, or None."""
    wanted = topology_path.resolve()
    for path, pid in _run_dirs():
        try:
            recorded = Path((path / TOPOLOGY_PATH_FILE).read_text(encoding="utf-8").strip())
        except OSError:
            continue
        if recorded == wanted and _alive(pid):
            return pid
    return None
