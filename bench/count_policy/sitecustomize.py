"""Benchmark only: with TREEWAVE_BENCH_POLICY=count, the balancer plans with the policy
treewave had before it balanced expected work (bench/count_policy/count_policy_impl.py).

`bench/balancing_quality.py` puts this directory on PYTHONPATH of the `treewave run` it
starts, so every process of that cluster imports this file at start-up; the product
itself has no switch for it. It replaces the name the balancer's rebalancing round calls
(`treewave.balancer.cluster.plan_moves`) and fails loudly if that name is gone, so a
refactoring can never turn the `old` column silently into the current policy again
(tests/unit/test_bench_count_policy.py checks the swap).
"""

from __future__ import annotations

import os

if os.environ.get("TREEWAVE_BENCH_POLICY") == "count":
    from count_policy_impl import plan_moves_by_count  # type: ignore[import-not-found]

    import treewave.balancer.cluster as _cluster

    if not callable(getattr(_cluster, "plan_moves", None)):
        raise RuntimeError(
            "bench/count_policy: treewave.balancer.cluster.plan_moves is gone, so the old "
            "policy cannot be swapped in; update sitecustomize.py"
        )
    setattr(_cluster, "plan_moves", plan_moves_by_count)  # noqa: B010 - a module, swapped
