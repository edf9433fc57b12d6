"""What the topology-change tests share (tests/unit/test_migration.py and
test_migration_transfers.py): the random topologies a migration goes between."""

from __future__ import annotations

from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.topology import Settings, Topology


def drain_topology(names: list[str], seed: int, grace: float) -> Topology:
    """A random DAG on exactly `names` (at most 2 children, some extra parents, 1-3 cpus,
    no initial tasks) whose drain grace is `grace`."""
    return random_topology(
        len(names),
        seed,
        TreeShape(max_children=2, extra_parents=1, cpus=(1, 3), tasks=(0, 0)),
        names=names,
        settings=Settings(drain_grace_s=grace),
    )
