"""`treewave run` as a user runs it: the console script as a background process whose
output is collected line by line, with its servers' ports and pids read from the ready
banner. Used by the `run` and client-command tests and by the benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.commands import clean_env, treewave_command
from tests.support.ports import free_port_block

__all__ = [
    "NAMES",
    "TOPOLOGY",
    "RunProcess",
    "children_of",
    "cmdline",
    "proc_stat",
    "start_run",
    "write_topology",
]

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0

TOPOLOGY: dict[str, Any] = {
    "settings": {"task_time_s": 0.2, "rebalance_interval_s": 0, "wave_timeout_s": 10},
    "servers": [
        {"name": "alpha", "cpus": 2, "children": ["beta", "gamma"]},
        {"name": "beta", "cpus": 1, "children": ["delta"]},
        {"name": "gamma", "cpus": 2, "children": ["delta", "echo"]},
        {"name": "delta", "cpus": 1},
        {"name": "echo", "cpus": 3},
    ],
}
NAMES = [s["name"] for s in TOPOLOGY["servers"]]

SERVER_LINE = re.compile(
    r"^\s+(?P<name>[a-z0-9-]+)\s+http://127\.0\.0\.1:(?P<port>\d+)\s+pid (?P<pid>\d+)$"
)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def children_of(pid: int) -> set[int]:
    """Direct children, from /proc (every process whose parent is `pid`)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None and stat[1] == pid:
                found.add(int(entry.name))
    return found


@dataclass
class RunProcess:
    """A `treewave run` process with its output collected line by line."""

    proc: subprocess.Popen[str]
    balancer_port: int
    lines: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    reader: threading.Thread | None = None
    servers: dict[str, tuple[int, int]] = field(default_factory=dict)
    """name -> (port, pid), from the ready output (the balancer is "balancer")."""
    seen_pids: set[int] = field(default_factory=set)

    @property
    def balancer_url(self) -> str:
        return f"http://127.0.0.1:{self.balancer_port}"

    @property
    def output(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def start_reader(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader_alive()):
                    raise AssertionError(
                        f"no line matching {pattern!r} (exit code {self.proc.poll()}); "
                        f"output so far:\n" + "\n".join(self.lines)
                    )
                self.cond.wait(min(left, 0.5))

    def reader_alive(self) -> bool:
        return self.reader is not None and self.reader.is_alive()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the ready banner; then `servers` holds every server's port and pid."""
        self.wait_for(r"^try: treewave status", timeout)
        with self.cond:
            for line in self.lines:
                m = SERVER_LINE.match(line)
                if m:
                    self.servers[m["name"]] = (int(m["port"]), int(m["pid"]))
        self.seen_pids |= {pid for _, pid in self.servers.values()}

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        if self.reader is not None:
            self.reader.join(timeout=10)
        return code

    def kill_everything(self) -> None:
        """Teardown: a graceful stop if it still runs (so it removes its run directory),
        SIGKILL if that fails, then SIGKILL any child that survived (there should be none)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.seen_pids:
            if any("--name" in a or a == "balancer" for a in cmdline(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def write_topology(directory: Path, data: dict[str, Any] | None = None) -> Path:
    path = directory / "topology.json"
    path.write_text(json.dumps(data or TOPOLOGY, indent=2), encoding="utf-8")
    return path


def start_run(
    directory: Path,
    *extra: str,
    base_port: int | None = None,
    port: int | None = None,
    topology: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    rebalance_interval: float | None = 0.0,
) -> RunProcess:
    """Start `treewave run` on `topology` (default: TOPOLOGY) from `directory`, on free
    ports unless given, without periodic rebalancing (`rebalance_interval=None`: as the
    topology file says); `extra` arguments go last (and win)."""
    data = topology or TOPOLOGY
    topology_file = write_topology(directory, data)
    balancer_port = port or free_port_block(1)
    base = base_port if base_port is not None else free_port_block(len(data["servers"]) + 2)
    proc = subprocess.Popen(
        [
            *treewave_command(),
            "run",
            "--topology",
            str(topology_file),
            "--port",
            str(balancer_port),
            "--base-port",
            str(base),
            *(
                []
                if rebalance_interval is None
                else ["--rebalance-interval", f"{rebalance_interval:g}"]
            ),
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or clean_env(),
        cwd=directory,
    )
    run = RunProcess(proc, balancer_port)
    run.start_reader()
    return run
