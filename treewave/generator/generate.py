"""Random topologies with word names: `treewave generate` and the end-to-end tests use it."""

from __future__ import annotations

from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.topology import Settings, Topology
from treewave.generator.words import random_names

__all__ = ["generate"]


def generate(
    nodes: int,
    seed: int,
    max_children: int = 3,
    extra_parents: int = 0,
    cpus: tuple[int, int] = (1, 4),
    tasks: tuple[int, int] = (0, 3),
    settings: Settings | None = None,
) -> Topology:
    """A random rooted DAG of `nodes` word-named servers; the same arguments give the same
    `Topology.dumps()` bytes, so a seed is enough to share a topology."""
    for label, (lo, hi) in (("cpus", cpus), ("tasks", tasks)):
        if lo > hi:
            raise ValueError(f"{label} range {lo}-{hi} is empty")
    if cpus[0] < 1:
        raise ValueError("cpus must be at least 1")
    if tasks[0] < 0:
        raise ValueError("tasks cannot be negative")
    if extra_parents < 0:
        raise ValueError("extra_parents cannot be negative")
    # Names get their own stream (seed-derived) so changing the shape keeps the names.
    names = random_names(nodes, seed)
    shape = TreeShape(
        max_children=max_children, extra_parents=extra_parents, cpus=cpus, tasks=tasks
    )
    return random_topology(nodes, seed, shape=shape, names=names, settings=settings)
