"""Fixtures for the fault tests: `fault_cluster(topology, env=..., wave_timeout_s=...)`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import BALANCER, ClusterPool

from .support import FaultCluster

StartFaultCluster = Callable[..., FaultCluster]


@pytest.fixture
def fault_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartFaultCluster]:
    """Factory: `fault_cluster(topology, env={name: {VAR: value}}, wave_timeout_s=2.0)`
    -> a ready `FaultCluster` (every server with a state directory). Every process it
    started is stopped and reaped at teardown; a process that died without the test
    meaning it to, or ignored SIGTERM, fails the test; logs are printed on failure."""
    pool = ClusterPool(tmp_path, FaultCluster)

    def start(
        topology: dict[str, Any],
        env: dict[str, dict[str, str]] | None = None,
        wave_timeout_s: float = 2.0,
        balancer_args: tuple[str, ...] = (),
    ) -> FaultCluster:
        cluster = pool.start(
            topology,
            extra_args={BALANCER: list(balancer_args)},
            env=env or {},
            state_dir=True,
            wave_timeout_s=wave_timeout_s,
        )
        assert isinstance(cluster, FaultCluster)
        return cluster

    yield start
    failed = any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )
    pool.close(print_logs=failed)
