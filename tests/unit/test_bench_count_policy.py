"""The balancing benchmark's `old` column must really run the old (count) policy: its
start-up hook swaps the function the balancer's rebalancing round calls. (It once patched
a module the round no longer called, and the `old` column silently ran the new policy.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = (
    "import count_policy_impl, treewave.balancer.cluster as c; "
    "print(c.plan_moves is count_policy_impl.plan_moves_by_count)"
)


def _probe(policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TREEWAVE_BENCH_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench" / "count_policy"), str(REPO)])
    if policy is not None:
        env["TREEWAVE_BENCH_POLICY"] = policy
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_count_policy_replaces_what_the_rebalancing_round_calls() -> None:
    assert _probe("count") == "True"


def test_without_the_switch_the_balancer_keeps_its_own_policy() -> None:
    assert _probe(None) == "False"
