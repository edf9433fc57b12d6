"""What the balancer machine hands its shell: frozen effects to carry out.

The shell sends, resolves the futures its callers wait on, saves, counts and publishes;
it decides nothing. A send that fails goes back to the machine (`send_failed`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from treewave.core.echo import EchoInitiator
from treewave.core.events import Send
from treewave.core.finn import FinnInitiator
from treewave.core.messages import Message, ServerState, TasksAccepted, TracePart
from treewave.core.policy import Move

__all__ = [
    "DrainMoved",
    "Effect",
    "RemoteError",
    "RoundFinished",
    "SaveState",
    "SendTo",
    "ServerRetired",
    "ShowMigration",
    "SubmissionConfirmed",
    "SubmissionTimedOut",
    "TraceArrived",
    "TransferFinished",
    "TransferSettled",
    "WaveFinished",
    "WaveOutcome",
    "WaveStarted",
]


@dataclass(frozen=True, slots=True)
class SendTo:
    """Send `message` to the server called `to`; tell the machine if it cannot go."""

    to: str
    message: Message


@dataclass(frozen=True, slots=True)
class WaveStarted:
    """A wave begins (for its trace): its initiator and first sends (sent as `SendTo`s)."""

    initiator: EchoInitiator | FinnInitiator
    sends: tuple[Send, ...]


@dataclass(frozen=True, slots=True)
class WaveOutcome:
    """How one wave ended, with the deadline it ran under."""

    wave_id: str
    algorithm: Literal["echo", "finn"]
    trigger: str
    complete: bool
    missing: tuple[str, ...]
    messages: int
    duration_s: float
    deadline_s: float
    """The deadline rule applied to the topology and settings in force at its start."""
    states: tuple[ServerState, ...] = ()
    decided: tuple[str, ...] = ()
    periodic: bool = False
    """Part of a periodic rebalancing round (its trace is only sampled)."""


@dataclass(frozen=True, slots=True)
class WaveFinished:
    outcome: WaveOutcome


@dataclass(frozen=True, slots=True)
class RoundFinished:
    """A rebalancing round: Echo before, the policy's plan, its transfers, Echo after
    (the same wave as before when nothing was planned)."""

    round_id: str
    periodic: bool
    policy: str
    before: WaveOutcome
    after: WaveOutcome
    planned: tuple[Move, ...]
    moved: tuple[int, ...]
    """Tasks each planned move moved (0: it failed or found nothing to move)."""


@dataclass(frozen=True, slots=True)
class TransferFinished:
    """The answer for whoever started transfer `transfer` (exactly once)."""

    transfer: str
    moved: int
    outcome: Literal["committed", "aborted", "empty", "in_doubt"]


@dataclass(frozen=True, slots=True)
class TransferSettled:
    """A transfer reached its end (also one recovered after a restart): for metrics."""

    transfer: str
    outcome: Literal["committed", "aborted", "empty"]
    moved: int


@dataclass(frozen=True, slots=True)
class DrainMoved:
    """A drain move (off a retiring server) finished with `moved` tasks moved."""

    source: str
    target: str
    moved: int


@dataclass(frozen=True, slots=True)
class SubmissionConfirmed:
    first: str
    accepted: TasksAccepted


@dataclass(frozen=True, slots=True)
class SubmissionTimedOut:
    """The server did not confirm in time: the tasks may or may not be queued there."""

    first: str


@dataclass(frozen=True, slots=True)
class SaveState:
    """The migration changed: persist it (and show it)."""


@dataclass(frozen=True, slots=True)
class ShowMigration:
    """The migration's timers ran (grace left changed): show it, nothing to persist."""


@dataclass(frozen=True, slots=True)
class ServerRetired:
    """It holds nothing: drop its link; it may be stopped."""

    server: str


@dataclass(frozen=True, slots=True)
class TraceArrived:
    peer: str
    part: TracePart


@dataclass(frozen=True, slots=True)
class RemoteError:
    """A server reported an error (logged)."""

    peer: str
    error: str


Effect = (
    SendTo
    | WaveStarted
    | WaveFinished
    | RoundFinished
    | TransferFinished
    | TransferSettled
    | DrainMoved
    | SubmissionConfirmed
    | SubmissionTimedOut
    | SaveState
    | ShowMigration
    | ServerRetired
    | TraceArrived
    | RemoteError
)
