"""What the state machines hand back to their shell: messages to send and decisions."""

from __future__ import annotations

from dataclasses import dataclass

from treewave.core.messages import EchoExplore, EchoReply, FinnSets, FinnWork, ServerState

__all__ = ["EchoResult", "FinnDecided", "FinnResult", "Output", "Send"]


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver `message` to the neighbour called `to`."""

    to: str
    message: EchoExplore | EchoReply | FinnSets


@dataclass(frozen=True, slots=True)
class FinnDecided:
    """This server decided in Finn wave `wave`: perform `work` now (exactly once)."""

    wave: str
    work: FinnWork


@dataclass(frozen=True, slots=True)
class EchoResult:
    """The initiator's decision for an Echo wave."""

    wave: str
    complete: bool
    states: tuple[ServerState, ...]
    messages: int
    """Messages the wave sent, counted by the servers themselves (2|E| when complete)."""


@dataclass(frozen=True, slots=True)
class FinnResult:
    """The initiator's decision for a Finn wave."""

    wave: str
    complete: bool
    decided: tuple[str, ...]
    messages: int


Output = Send | FinnDecided
