"""A real cluster (one process per server plus the balancer, on free local ports, launched
by the support package as for every other test) and a headless Debian Chromium driven by
selenium, for the status page's browser tests.

Without chromium/chromedriver (or selenium) the tests skip with the reason, unless
TREEWAVE_REQUIRE_BROWSER=1 makes that a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import BALANCER, Cluster, ClusterPool
from tests.support.commands import REPO
from tests.support.outcome import failed
from treewave.core.topology import Topology

ARTIFACTS = REPO / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


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
def start_cluster(
    browser_available: None, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Cluster]]:
    """Start a cluster: `start_cluster(topology, directory, timeout_s=..., balancer_args=[...])`
    (status updates every second); all of them are stopped at teardown."""
    pools: list[ClusterPool] = []

    def start(
        topology: Topology,
        directory: Path,
        timeout_s: float = 90.0,
        balancer_args: tuple[str, ...] = (),
    ) -> Cluster:
        pool = ClusterPool(directory)
        pools.append(pool)
        return pool.start(
            topology.to_json_data(),
            extra_args={BALANCER: list(balancer_args)},
            status_interval_s=1.0,
            ready_timeout_s=timeout_s,
        )

    try:
        yield start
    finally:
        for pool in pools:
            pool.close(print_logs=failed(request.node))


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
