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
from tests.support.outcome import failed


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
