"""The Echo wave (Chang/Segall), sans-IO.

On the undirected graph under the topology, with the balancer linked to the root: the
first explore a server receives makes its sender the server's parent; the server explores
every other neighbour; an explore received from a non-parent neighbour is that
neighbour's answer, a reply is a child's answer with its subtree's state. When every
neighbour but the parent has answered, the server replies to its parent. Each link carries
exactly two messages, so a complete wave costs exactly 2|E|.

Every server also has a deadline (the budget in the explore it took as its parent's,
shorter by a fixed step per hop so children give up before their parents): past it, the
server replies with what it has, so a dead server makes the wave partial instead of
hanging it. The step is linear, not a factor, so a chain of 100 servers keeps most of the
budget at its far end.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from treewave.core.errors import LocalProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.events import EchoResult, Send
from treewave.core.messages import EchoExplore, EchoReply, ServerState, trusted, trusted_copy
from treewave.core.topology import BALANCER

__all__ = [
    "DEFAULT_HOPS",
    "EchoInitiator",
    "EchoNodeWave",
    "EchoPhase",
    "InitiatorPhase",
    "LocalState",
    "next_budget",
]

DEFAULT_HOPS = 20
"""Without a hint, the per-hop step is this fraction of the wave's budget."""


LocalState = ServerState | Callable[[], ServerState]
"""The server's own state, or how to get it: only a reply reads it, so a shell whose
state costs something to build (a queue histogram, a validated model) hands over a
function and most messages never call it."""


def _resolve(local: LocalState) -> ServerState:
    return local if isinstance(local, ServerState) else local()


def next_budget(budget_s: float, hop_s: float) -> float:
    """A neighbour's budget: one step shorter, but never below one step."""
    return max(budget_s - hop_s, hop_s) if hop_s > 0 else budget_s


class EchoPhase(Enum):
    EXPLORING = "exploring"
    """Took a parent, waiting for the other neighbours."""
    ECHOED = "echoed"
    """Replied to the parent; the wave is over here."""


class EchoNodeWave:
    """One server's part in one Echo wave. Created by the first explore it receives."""

    # Slots: a simulated million servers each hold one while the wave passes.
    __slots__ = (
        "budget_s", "deadline", "gone", "hop_s", "name", "parent", "pending", "phase",
        "sent", "states", "wave",
    )  # fmt: skip

    def __init__(
        self,
        wave: str,
        name: str,
        neighbours: tuple[str, ...],
        first: EchoExplore,
        now: float,
    ) -> None:
        if first.sender not in neighbours:
            raise RemoteProtocolError(
                f"echo wave {wave}: {first.sender!r} is not a neighbour of {name!r}",
                reason="not_neighbour",
            )
        self.wave = wave
        self.name = name
        self.parent = first.sender
        self.pending = set(neighbours) - {first.sender}
        self.states: list[ServerState] = []
        self.sent = 0
        self.budget_s = first.budget_s
        self.hop_s = first.hop_s
        self.deadline = now + first.budget_s
        self.phase = EchoPhase.EXPLORING
        self.gone: frozenset[str] = frozenset()
        """Neighbours whose explore could not go out (`unreachable`)."""

    def start(self, local: LocalState) -> list[Send]:
        """Explore every neighbour but the parent (or reply at once if there is none)."""
        if not self.pending:
            return [self._reply(local)]
        budget = next_budget(self.budget_s, self.hop_s)
        explore = trusted(
            EchoExplore, wave=self.wave, sender=self.name, budget_s=budget, hop_s=self.hop_s
        )
        out = [Send(to, explore) for to in sorted(self.pending)]
        self.sent += len(out)
        return out

    def receive(self, msg: EchoExplore | EchoReply, local: LocalState) -> list[Send]:
        if self.phase is EchoPhase.ECHOED:
            raise StaleMessage(f"echo wave {self.wave} is already over at {self.name!r}")
        if msg.sender not in self.pending:
            if msg.sender in self.gone:
                raise StaleMessage(f"echo wave {self.wave}: {msg.sender!r} was given up")
            if msg.sender == self.parent:
                what = "its parent sent again"
            else:
                what = f"{msg.sender!r} already answered or is not a neighbour"
            raise RemoteProtocolError(
                f"echo wave {self.wave} at {self.name!r}: {what}", reason="unexpected_sender"
            )
        if isinstance(msg, EchoReply):
            if not msg.states or msg.states[0].name != msg.sender:
                raise RemoteProtocolError(
                    f"echo reply from {msg.sender!r} does not start with its own state",
                    reason="invalid_fields",
                )
            self.states.extend(msg.states)
            self.sent += msg.sent
        self.pending.discard(msg.sender)
        if self.pending:
            return []
        return [self._reply(local)]

    def unreachable(self, to: str, local: LocalState) -> list[Send]:
        """The explore to `to` could not go out (no link to it): `to` takes no part in
        this wave, so waiting for its answer would only hold the wave, and every wave
        above it, until the deadline. It counts as answered with nothing (the wave is
        partial, `to` missing) and the explore as never sent."""
        if self.phase is not EchoPhase.EXPLORING or to not in self.pending:
            return []
        self.pending.discard(to)
        self.gone |= {to}
        self.sent -= 1
        if self.pending:
            return []
        return [self._reply(local)]

    def handle_timer(self, now: float, local: LocalState) -> list[Send]:
        """Past the deadline, answer the parent with whatever arrived."""
        if self.phase is EchoPhase.EXPLORING and now >= self.deadline:
            return [self._reply(local)]
        return []

    def _reply(self, local: LocalState) -> Send:
        self.phase = EchoPhase.ECHOED
        own = trusted_copy(_resolve(local), echo_parent=self.parent)
        self.sent += 1
        # Built unvalidated: every state in it was validated when it arrived (and one
        # reply near the root of a big tree carries thousands of them).
        reply = trusted(
            EchoReply, wave=self.wave, sender=self.name, states=(own, *self.states), sent=self.sent
        )
        self.states = []
        return Send(self.parent, reply)


class InitiatorPhase(Enum):
    IDLE = "idle"
    WAITING = "waiting"
    DECIDED = "decided"


class EchoInitiator:
    """The balancer's side: explores the root, decides when the root replies or at the
    deadline (then partial, with whatever the root had gathered if it replied late)."""

    def __init__(self, wave: str, root: str, expected: frozenset[str]) -> None:
        self.wave = wave
        self.root = root
        self.expected = expected
        self.phase = InitiatorPhase.IDLE
        self.deadline = 0.0
        self.result: EchoResult | None = None

    def start(self, now: float, budget_s: float, hop_s: float | None = None) -> list[Send]:
        """Explore the root. `hop_s` is the per-hop budget step; the balancer sets it from
        the topology's depth (default: a twentieth of the budget)."""
        if self.phase is not InitiatorPhase.IDLE:
            raise LocalProtocolError(f"echo wave {self.wave} already started")
        self.phase = InitiatorPhase.WAITING
        self.deadline = now + budget_s
        # The root gets a shorter budget, like every other hop, so that when it has to
        # give up on a child it still answers before the initiator's own deadline.
        step = budget_s / DEFAULT_HOPS if hop_s is None else hop_s
        explore = EchoExplore(
            wave=self.wave,
            sender=BALANCER,
            budget_s=next_budget(budget_s, step),
            hop_s=step,
        )
        return [Send(self.root, explore)]

    def receive(self, msg: EchoExplore | EchoReply, now: float | None = None) -> EchoResult:
        """The root's reply decides the wave. (`now` is unused: a decision on receipt
        does not depend on time; the parameter keeps every machine's surface the same.)"""
        if self.phase is InitiatorPhase.DECIDED:
            raise StaleMessage(f"echo wave {self.wave} already decided")
        if self.phase is InitiatorPhase.IDLE:
            raise LocalProtocolError(f"echo wave {self.wave} not started")
        if msg.sender != self.root or not isinstance(msg, EchoReply):
            raise RemoteProtocolError(
                f"echo wave {self.wave}: only the root {self.root!r} replies to the balancer, "
                f"got {msg.type} from {msg.sender!r}",
                reason="unexpected_sender",
            )
        names = [s.name for s in msg.states]
        unique = set(names)
        if len(unique) != len(names) or not unique <= self.expected:
            raise RemoteProtocolError(
                f"echo wave {self.wave}: the snapshot has duplicate or unknown servers",
                reason="invalid_fields",
            )
        return self._decide(msg.states, msg.sent + 1)

    def handle_timer(self, now: float) -> EchoResult | None:
        if self.phase is InitiatorPhase.WAITING and now >= self.deadline:
            return self._decide((), 1)
        return None

    def _decide(self, states: tuple[ServerState, ...], messages: int) -> EchoResult:
        self.phase = InitiatorPhase.DECIDED
        complete = {s.name for s in states} == self.expected
        self.result = EchoResult(self.wave, complete, states, messages)
        return self.result
