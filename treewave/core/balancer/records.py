"""The balancer machine's bookkeeping records: waves in flight, rounds, waiting moves."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from treewave.core.balancer.effects import WaveOutcome
from treewave.core.echo import EchoInitiator
from treewave.core.finn import FinnInitiator
from treewave.core.migration import MoveQueued
from treewave.core.policy import Move

__all__ = ["DrainMove", "Round", "RoundPhase", "WaveInFlight"]


class RoundPhase(Enum):
    """Where a rebalancing round is."""

    BEFORE = "echo-before"
    MOVING = "moving"
    AFTER = "echo-after"


@dataclass
class WaveInFlight:
    """A wave the machine started and has not decided, with the deadline it got."""

    initiator: EchoInitiator | FinnInitiator
    trigger: str
    started: float
    deadline_s: float
    expected: frozenset[str]
    round_id: str | None = None


@dataclass
class Round:
    """A rebalancing round: Echo before, the plan's transfers, Echo after."""

    round_id: str
    periodic: bool
    phase: RoundPhase = RoundPhase.BEFORE
    policy: str = ""
    before: WaveOutcome | None = None
    planned: tuple[Move, ...] = ()
    moved: list[int] = field(default_factory=list)
    transfers: dict[str, int] = field(default_factory=dict)
    """Transfers in flight -> the index of their planned move."""


@dataclass
class DrainMove:
    """A drain move waiting for its servers' links (or for `wait_until`)."""

    move: MoveQueued
    wait_until: float
