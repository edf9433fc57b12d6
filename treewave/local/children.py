"""The children of a local run: started in their own process group, tied to the
supervisor's life by the kernel, stopped with SIGTERM then SIGKILL, always reaped.

How nothing outlives the supervisor:

- Each child runs in its own process group, so a Ctrl-C at the terminal reaches only the
  supervisor, which then stops the children itself; signals go to the whole group.
- On Linux each child asks the kernel (`prctl(PR_SET_PDEATHSIG, SIGKILL)`, from a
  `preexec_fn`) to be killed when its parent goes, so even a SIGKILLed supervisor leaves no
  server behind (only its run directory, which the next `treewave run` removes). Two
  caveats shape the code: the death signal fires when the *thread* that forked the child
  exits, and `preexec_fn` is unsafe when other threads exist. The supervisor therefore has
  exactly one thread and forks every child from it (no executor, no asyncio child
  watcher). `prctl` is looked up before forking, and the child checks that its parent did
  not die before the `prctl` took effect.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "Child",
    "child_command",
    "death_signal_preexec",
    "describe_exit",
    "stop_children",
    "tail",
]

PR_SET_PDEATHSIG = 1


def death_signal_preexec() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child die with this process (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    kill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def child_command() -> list[str]:
    """How to run `treewave` in a child: the console script next to this interpreter (so
    `ps` shows `.../treewave node --name NAME`), else the module."""
    script = Path(sys.executable).parent / "treewave"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "treewave.cli.main"]


@dataclass
class Child:
    name: str
    """A server's name, or "balancer"."""
    kind: Literal["node", "balancer"]
    port: int
    argv: list[str]
    log_path: Path
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    """Deaths in a row, each soon after its start (drives the backoff)."""
    restart_at: float | None = None
    recovering: bool = False
    """Restarted after a death; announce when it is healthy again."""

    @property
    def label(self) -> str:
        return "the balancer" if self.kind == "balancer" else f"server {self.name}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, preexec: Callable[[], None] | None) -> None:
        """Fork it (from the supervisor's one thread: see the module docstring), its output
        appended to its log file, in a process group of its own."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
                preexec_fn=preexec,
            )
        self.started_at = time.monotonic()
        self.restart_at = None

    def signal(self, sig: signal.Signals) -> None:
        """Signal the child's process group (the child and anything it started)."""
        if self.proc is None or self.proc.poll() is not None:
            return  # reaped: its pid may belong to someone else by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float) -> None:
        """SIGTERM, SIGKILL after `grace` seconds, reaped; no restart pending."""
        stop_children([self], grace)
        self.restart_at = None


def stop_children(
    children: Sequence[Child],
    grace: float,
    hurry: Callable[[], bool] = lambda: False,
    on_kill: Callable[[Child], None] = lambda child: None,
) -> None:
    """SIGTERM to each live child, SIGKILL to those still alive after `grace` seconds (or
    as soon as `hurry()` says so), then reap every one of them: no zombie."""
    live = [c for c in children if c.alive()]
    for child in live:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(c.alive() for c in live) and time.monotonic() < deadline and not hurry():
        time.sleep(0.05)
    for child in live:
        if child.alive():
            on_kill(child)
            child.signal(signal.SIGKILL)
    for child in children:
        if child.proc is not None:
            child.proc.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def tail(path: Path, lines: int = 5) -> list[str]:
    """The last non-blank lines of a log file ([] when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
