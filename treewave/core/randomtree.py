"""Seeded random rooted DAGs, for the generator and the simulator (pure, no I/O)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from treewave.core.messages import trusted
from treewave.core.topology import ServerSpec, Settings, Topology

__all__ = ["TreeShape", "random_topology"]


@dataclass(frozen=True)
class TreeShape:
    """Ranges the random topology is drawn from (inclusive)."""

    max_children: int = 3
    extra_parents: int = 0
    cpus: tuple[int, int] = (1, 4)
    tasks: tuple[int, int] = (0, 3)


def random_topology(
    nodes: int,
    seed: int,
    shape: TreeShape = TreeShape(),
    names: Sequence[str] | None = None,
    settings: Settings | None = None,
) -> Topology:
    """A random tree of `nodes` servers plus `shape.extra_parents` extra parent edges.

    Server i attaches to a random earlier server that still has room for a child, so the
    result is acyclic by construction (edges always go from a lower to a higher index);
    extra parent edges obey the same rule, which keeps the graph a rooted DAG.
    """
    if nodes < 1:
        raise ValueError("nodes must be >= 1")
    if shape.max_children < 1:
        raise ValueError("max_children must be >= 1")
    if names is None:
        width = len(str(nodes))
        names = [f"s{i:0{width}d}" for i in range(nodes)]
    if len(names) != nodes or len(set(names)) != nodes:
        raise ValueError("need exactly one unique name per server")
    rng = random.Random(seed)
    children: list[list[int]] = [[] for _ in range(nodes)]
    open_slots: list[int] = [0]  # servers that can still take a child
    for i in range(1, nodes):
        k = rng.randrange(len(open_slots))
        parent = open_slots[k]
        children[parent].append(i)
        if len(children[parent]) >= shape.max_children:
            open_slots[k] = open_slots[-1]
            open_slots.pop()
        open_slots.append(i)
    added = 0
    attempts = 0
    while added < shape.extra_parents and attempts < 50 * (shape.extra_parents + 1) and nodes > 2:
        attempts += 1
        child = rng.randrange(2, nodes)
        parent = rng.randrange(1, child)
        if child in children[parent] or len(children[parent]) >= shape.max_children:
            continue
        children[parent].append(child)
        added += 1
    # The draws lie within these ranges: checked once at both ends, each server is then
    # built without validating it again (a million validations cost seconds).
    for cpus, tasks in zip(shape.cpus, shape.tasks, strict=True):
        ServerSpec(name=names[0], cpus=cpus, tasks=tasks)
    randint = rng.randint
    servers = [
        trusted(
            ServerSpec,
            name=names[i],
            cpus=randint(*shape.cpus),
            tasks=randint(*shape.tasks),
            children=tuple([names[c] for c in children[i]]),
        )
        for i in range(nodes)
    ]
    return Topology.from_servers(servers, settings)
