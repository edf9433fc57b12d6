"""A real cluster (one process per server plus the balancer, on free local ports) and a
headless Debian Chromium driven by selenium, for the status page's browser tests.

Without chromium/chromedriver (or selenium) the tests skip with the reason, unless
TREEWAVE_REQUIRE_BROWSER=1 makes that a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Service
from tests.support.commands import REPO
from tests.support.http import get_json
from tests.support.ports import free_ports
from treewave.core.topology import Topology

ARTIFACTS = REPO / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@dataclass
class Cluster:
    """Every server of `topology` and the balancer as child processes."""

    topology: Topology
    directory: Path
    status_interval_s: float = 1.0
    balancer_args: list[str] = field(default_factory=list)
    """Extra arguments for the balancer (e.g. an API token)."""
    ports: dict[str, int] = field(default_factory=dict)
    balancer_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.balancer_port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        service = Service(name, 0, args, self.directory / f"{name}.log")
        service.start()
        assert service.proc is not None
        self.procs[name] = service.proc

    def start(self, timeout_s: float = 90.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        topo = self.directory / "topology.json"
        topo.write_text(self.topology.dumps(), encoding="utf-8")
        *node_ports, self.balancer_port = free_ports(len(self.topology) + 1)
        self.ports = dict(zip(self.topology.names, node_ports, strict=True))
        peers = self.directory / "peers.json"
        peers.write_text(
            json.dumps({n: f"ws://127.0.0.1:{p}/ws" for n, p in self.ports.items()}),
            encoding="utf-8",
        )
        common = ["--topology", str(topo), "--peers", str(peers), "--host", "127.0.0.1"]
        for name, port in self.ports.items():
            self._spawn(name, ["node", "--name", name, "--port", str(port), *common])
        self._spawn(
            "balancer",
            [
                "balancer",
                "--port",
                str(self.balancer_port),
                "--rebalance-interval",
                "0",
                "--status-interval",
                str(self.status_interval_s),
                *common,
                *self.balancer_args,
            ],
        )
        self.wait_links(len(self.topology), timeout_s)

    def wait_links(self, up: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in self.stopped:
                    raise RuntimeError(f"{name} exited early:\n{self.log(name)}")
            with contextlib.suppress(OSError, ValueError):
                last = get_json(self.url + "/healthz", timeout=2)
                if last.get("links_up") == up:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the balancer did not get {up} links in {timeout_s} s: {last}")

    def stop_server(self, name: str) -> None:
        self.stopped.add(name)
        proc = self.procs[name]
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace")[-4000:] if path.exists() else ""

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _browser_problem() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).exists() or shutil.which(Path(path).name)):
            return f"{path} not found (apt-get install {package}, or scripts/install-browser.sh)"
    return None


@pytest.fixture(scope="session")
def browser_available() -> None:
    problem = _browser_problem()
    if problem is None:
        return
    if os.environ.get("TREEWAVE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"TREEWAVE_REQUIRE_BROWSER=1 but {problem}")
    pytest.skip(problem)


@pytest.fixture
def driver(browser_available: None, tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    binary = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    assert binary is not None, "browser_available found chromium"
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver_path = CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    drv = webdriver.Chrome(options=options, service=service)
    try:
        drv.set_window_size(1280, 800)
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def start_cluster(browser_available: None) -> Iterator[Callable[..., Cluster]]:
    """Start a cluster: `start_cluster(topology, directory, timeout_s=..., balancer_args=[...])`;
    all of them are stopped at teardown."""
    started: list[Cluster] = []

    def start(
        topology: Topology,
        directory: Path,
        timeout_s: float = 90.0,
        balancer_args: tuple[str, ...] = (),
    ) -> Cluster:
        cluster = Cluster(topology, directory, balancer_args=list(balancer_args))
        started.append(cluster)
        cluster.start(timeout_s)
        return cluster

    try:
        yield start
    finally:
        for cluster in started:
            cluster.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
