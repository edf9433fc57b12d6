"""Fixtures for clusters of real processes on loopback (`tests.support.cluster` does the
work): `start_cluster(topology, hold=(), extra_args={}, **ClusterOptions fields)` returns a
ready `Cluster`. Teardown stops and reaps every process it started, fails the test if one
had to be killed or died on its own, and prints every service's log when the test failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import ClusterPool, StartCluster


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def failed(item: pytest.Item) -> bool:
    """Whether the test's setup or body failed (teardown then prints the logs)."""
    return any(
        getattr(getattr(item, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


@pytest.fixture
def start_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartCluster]:
    """Factory: `start_cluster(topology_dict, hold=(), extra_args={})` -> a ready `Cluster`.

    Every process it starts is stopped and reaped at teardown, whatever happened."""
    pool = ClusterPool(tmp_path)
    yield pool.start
    pool.close(print_logs=failed(request.node))


@pytest.fixture(scope="module")
def start_module_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartCluster]:
    """Like `start_cluster`, but the clusters live until the module's last test is done
    (for tests that only read, or that account for what earlier tests changed)."""
    pool = ClusterPool(tmp_path_factory.mktemp("cluster"))
    failed_before = request.session.testsfailed
    yield pool.start
    pool.close(print_logs=request.session.testsfailed > failed_before)


@pytest.fixture
async def http() -> Any:
    """An aiohttp client session for the test body."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session
