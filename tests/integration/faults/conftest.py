"""Fixtures for the fault tests: `fault_cluster(topology, env=..., wave_timeout_s=...)`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import ClusterError, FaultCluster, build_cluster

START_ATTEMPTS = 3

StartFaultCluster = Callable[..., FaultCluster]


@pytest.fixture
def fault_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartFaultCluster]:
    """Factory: `fault_cluster(topology, env={name: {VAR: value}}, wave_timeout_s=2.0)`
    -> a ready `FaultCluster` (every server with a state directory). Every process it
    started is stopped and reaped at teardown; a process that died without the test
    meaning it to, or ignored SIGTERM, fails the test; logs are printed on failure."""
    clusters: list[FaultCluster] = []

    def start(
        topology: dict[str, Any],
        env: dict[str, dict[str, str]] | None = None,
        wave_timeout_s: float = 2.0,
        balancer_args: tuple[str, ...] = (),
    ) -> FaultCluster:
        last: Exception | None = None
        for attempt in range(START_ATTEMPTS):
            directory = tmp_path / f"cluster{len(clusters)}-try{attempt}"
            cluster = build_cluster(topology, directory, env, wave_timeout_s, balancer_args)
            clusters.append(cluster)
            cluster.start(set(cluster.services))
            try:
                cluster.wait_ready()
            except ClusterError as exc:
                # Most likely a port taken between choosing and binding it: try new ports.
                last = exc
                print(f"cluster start attempt {attempt + 1} failed: {exc}\n{cluster.logs()}")
                cluster.stop_all()
                clusters.remove(cluster)
                continue
            return cluster
        raise ClusterError(f"could not start the cluster: {last}")

    yield start

    problems: list[str] = []
    for cluster in clusters:
        problems += cluster.stop_all()
    failed = any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )
    if failed or problems:
        for cluster in clusters:
            print(cluster.logs())
    assert not problems, "; ".join(problems)
