"""The `local` runner: a real `treewave run` cluster (every server and the balancer as
processes on loopback), fed a workload through the balancer's HTTP API.

The policy is chosen the way a user chooses it: `settings.policy` in the topology file
the cluster runs. This module only starts and stops the cluster and finds its URLs (from
`treewave run`'s output); submitting the workload, polling the servers and computing the
result is `drive.run_workload`, shared with the `compose` runner.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from treewave.core.topology import Topology
from treewave.experiment.drive import Cluster, RunError
from treewave.local.errors import LocalRunError as PortsUnavailable
from treewave.local.ports import free_port, free_port_block

__all__ = ["LocalCluster", "LocalRunError", "local_cluster"]

HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
SERVER_LINE = re.compile(r"^\s+(?P<name>\S+)\s+http://127\.0\.0\.1:(?P<port>\d+)\s+pid \d+$")


class LocalRunError(RunError):
    """`treewave run` did not come up."""


@dataclass(kw_only=True)
class LocalCluster(Cluster):
    """A running `treewave run`: the URLs, its process and its output so far."""

    runner: ClassVar[str] = "local"
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)


@contextlib.contextmanager
def local_cluster(topology: Topology, log: Path | None = None) -> Iterator[LocalCluster]:
    """Start `treewave run` on `topology` (its settings choose the policy and interval);
    always stops it (SIGINT, then SIGKILL) and waits for it."""
    with tempfile.TemporaryDirectory(prefix="treewave-experiment-") as tmp:
        path = Path(tmp) / "topology.json"
        path.write_text(topology.dumps(), encoding="utf-8")
        try:
            port, base_port = free_port(), free_port_block(len(topology) + 2)
        except PortsUnavailable as exc:
            raise LocalRunError(str(exc)) from None
        cmd = [
            sys.executable,
            "-m",
            "treewave.cli.main",
            "run",
            "--topology",
            str(path),
            "--port",
            str(port),
            "--base-port",
            str(base_port),
            "--log-level",
            "WARNING",
            "--rebalance-interval",
            str(topology.settings.rebalance_interval_s),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TREEWAVE_")}
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        cluster = LocalCluster(topology, f"http://{HOST}:{port}", {}, proc=proc)
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                cluster.output.append(line.rstrip("\n"))
                m = SERVER_LINE.match(line.rstrip("\n"))
                if m and m["name"] in topology:
                    cluster.node_urls[m["name"]] = f"http://{HOST}:{m['port']}"
                if line.startswith("try: treewave status"):
                    ready.set()
            ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if not ready.wait(READY_TIMEOUT_S) or len(cluster.node_urls) != len(topology):
                tail = "\n".join(cluster.output[-20:])
                raise LocalRunError(f"`treewave run` did not come up; its output ends:\n{tail}")
            yield cluster
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            reader.join(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
            if log is not None:
                log.write_text("\n".join(cluster.output) + "\n", encoding="utf-8")
