"""A third-party treewave policy: each round, the longest queued task of the most pressed
server goes to the least pressed one, if that lowers the higher of the two pressures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from treewave.core.policy import Load, Move
from treewave.core.topology import Settings


@dataclass(frozen=True)
class NudgePolicy:
    name: str = "nudge"
    description: str = "one task per round from the most to the least pressed server"

    def plan(self, loads: Sequence[Load], settings: Settings) -> list[Move]:
        donors = [x for x in loads if x.queued]
        if len(loads) < 2 or not donors:
            return []
        src = max(donors, key=lambda x: x.pressure)
        dst = min((x for x in loads if x.name != src.name), key=lambda x: x.pressure)
        d = max(src.queued)
        if (dst.work_s + d) / dst.cpus >= src.pressure:
            return []  # it would only move the hot spot
        return [Move(src.name, dst.name, (d,))]
