"""Benchmark only: with TREEWAVE_BENCH_POLICY=count, the balancer plans with the policy
treewave had before it balanced expected work (bench/count_policy/policy.py).

`bench/balancing_quality.py` puts this directory on PYTHONPATH of the `treewave run` it
starts, so every process of that cluster imports this file at start-up; the product
itself has no switch for it.
"""

from __future__ import annotations

import os

if os.environ.get("TREEWAVE_BENCH_POLICY") == "count":
    from count_policy_impl import plan_moves_by_count

    import treewave.balancer.app as _app

    _app.plan_moves = plan_moves_by_count  # type: ignore[assignment]
