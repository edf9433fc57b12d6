"""The Finn wave (Finn 1979; Tel, ch. 6), sans-IO, with a decided set.

On the directed graph balancer -> root -> ... -> leaves -> balancer. Each participant keeps
`inc` (participants whose messages causally precede it, itself included) and `ninc`
(participants known to have heard from all their in-neighbours), sends both to its
out-neighbours whenever either grows, and decides when `inc == ninc`.

One addition makes the balancer's decision mean "every server has done the wave's work":
`dec` maps each participant known to have decided to the messages it sent in all, and a
participant also waits until every in-neighbour is in `dec`. Decisions are then ordered
from the root down; a server's sets are complete when it decides, so it never sends
after deciding; the balancer, whose in-neighbours are the leaves, decides last, knows
exactly how many messages the wave cost (the sum over `dec`), and nothing is sent after
it decides. On a tree every directed edge carries exactly one message.
"""

from __future__ import annotations

from enum import Enum

from treewave.core.errors import LocalProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.events import FinnDecided, FinnResult, Send
from treewave.core.messages import FinnSets, FinnWork
from treewave.core.topology import BALANCER


class FinnPhase(Enum):
    LISTENING = "listening"
    DECIDED = "decided"


class FinnKnowledge:
    """The three sets and the bookkeeping shared by servers and the balancer."""

    def __init__(self, name: str, in_neighbours: tuple[str, ...]) -> None:
        self.name = name
        self.in_neighbours = frozenset(in_neighbours)
        self.inc: set[str] = {name}
        self.ninc: set[str] = set()
        self.dec: dict[str, int] = {}
        self.unheard = set(in_neighbours)
        self.undecided_in = set(in_neighbours)
        self.phase = FinnPhase.LISTENING

    def check_sender(self, wave: str, sender: str) -> None:
        if sender not in self.in_neighbours:
            raise RemoteProtocolError(
                f"finn wave {wave}: {sender!r} is not an in-neighbour of {self.name!r}",
                reason="not_neighbour",
            )

    def check_message(self, wave: str, msg: FinnSets) -> None:
        """The sender must be an in-neighbour and its sets well-formed (sender in inc,
        ninc within inc, dec within ninc with positive counts): `ready()` compares sizes,
        so one malformed message could otherwise make a server decide early."""
        self.check_sender(wave, msg.sender)
        if (
            msg.sender not in msg.inc
            or not msg.ninc <= msg.inc
            or not msg.dec.keys() <= msg.ninc
            or any(sent < 1 for sent in msg.dec.values())
        ):
            raise RemoteProtocolError(
                f"finn wave {wave}: {msg.sender!r} sent inconsistent sets",
                reason="invalid_fields",
            )

    def merge(self, msg: FinnSets) -> bool:
        """Fold a message in; True when any set grew."""
        before = (len(self.inc), len(self.ninc), len(self.dec))
        self.inc |= msg.inc
        self.ninc |= msg.ninc
        for who, sent in msg.dec.items():
            if who not in self.dec:
                self.dec[who] = sent
                self.undecided_in.discard(who)
        self.unheard.discard(msg.sender)
        if not self.unheard:
            self.ninc.add(self.name)
        return before != (len(self.inc), len(self.ninc), len(self.dec))

    def ready(self) -> bool:
        """Finn's rule (`inc == ninc`; ninc is always a subset of inc) plus every
        in-neighbour decided."""
        return (
            self.phase is FinnPhase.LISTENING
            and len(self.inc) == len(self.ninc)
            and not self.undecided_in
        )


class FinnNodeWave:
    """One server's part in one Finn wave. Created by the first message it receives."""

    def __init__(
        self,
        wave: str,
        name: str,
        in_neighbours: tuple[str, ...],
        out_neighbours: tuple[str, ...],
        first: FinnSets,
        now: float,
    ) -> None:
        self.wave = wave
        self.sets = FinnKnowledge(name, in_neighbours)
        self.sets.check_message(wave, first)
        self.out = out_neighbours
        self.work = first.work
        self.budget_s = first.budget_s
        self.expires_at = first.expires_at
        self.deadline = now + first.budget_s
        self.sent = 0

    @property
    def phase(self) -> FinnPhase:
        return self.sets.phase

    def receive(self, msg: FinnSets) -> list[Send | FinnDecided]:
        self.sets.check_message(self.wave, msg)
        if msg.work != self.work:
            raise RemoteProtocolError(
                f"finn wave {self.wave}: {msg.sender!r} sent different work",
                reason="invalid_fields",
            )
        out: list[Send | FinnDecided] = []
        grew = self.sets.merge(msg)
        if self.sets.ready():
            self.sets.phase = FinnPhase.DECIDED
            out.append(FinnDecided(self.wave, self.work))
            grew = True
        if not grew:
            return out
        self.sent += len(self.out)
        if self.phase is FinnPhase.DECIDED:
            self.sets.dec[self.sets.name] = self.sent
        sets = FinnSets(
            wave=self.wave,
            sender=self.sets.name,
            inc=frozenset(self.sets.inc),
            ninc=frozenset(self.sets.ninc),
            dec=dict(self.sets.dec),
            work=self.work,
            budget_s=self.budget_s,
            expires_at=self.expires_at,
        )
        out.extend(Send(to, sets) for to in self.out)
        return out


class FinnInitiator:
    """The balancer: the source (sends into the root) and the sink (hears every leaf)."""

    def __init__(
        self,
        wave: str,
        root: str,
        leaves: tuple[str, ...],
        expected: frozenset[str],
        work: FinnWork,
    ) -> None:
        self.wave = wave
        self.root = root
        self.expected = expected
        self.known = expected | {BALANCER}
        self.work = work
        self.sets = FinnKnowledge(BALANCER, leaves)
        # As the source it has no in-neighbours: it is in ninc and decided from the start.
        self.sets.ninc.add(BALANCER)
        self.sets.dec[BALANCER] = 1
        self.started = False
        self.deadline = 0.0
        self.result: FinnResult | None = None

    def start(self, now: float, budget_s: float, expires_at: float | None = None) -> list[Send]:
        if self.started:
            raise LocalProtocolError(f"finn wave {self.wave} already started")
        self.started = True
        self.deadline = now + budget_s
        msg = FinnSets(
            wave=self.wave,
            sender=BALANCER,
            inc=frozenset(self.sets.inc),
            ninc=frozenset(self.sets.ninc),
            dec=dict(self.sets.dec),
            work=self.work,
            budget_s=budget_s,
            expires_at=expires_at,
        )
        return [Send(self.root, msg)]

    def receive(self, msg: FinnSets) -> FinnResult | None:
        if not self.started:
            raise LocalProtocolError(f"finn wave {self.wave} not started")
        if self.result is not None:
            if self._overtaken(msg):
                return None
            raise StaleMessage(f"finn wave {self.wave} already decided")
        self.sets.check_message(self.wave, msg)
        if not msg.inc <= self.known:
            raise RemoteProtocolError(
                f"finn wave {self.wave}: {msg.sender!r} names unknown servers",
                reason="invalid_fields",
            )
        self.sets.merge(msg)
        if self.sets.ready():
            return self._decide(complete=True)
        return None

    def _overtaken(self, msg: FinnSets) -> bool:
        """A leaf with several parents sends before and when it decides; when links do not
        keep order the earlier message can arrive after the decision. It adds nothing and
        is absorbed, as a server absorbs it; a late message with news is stale."""
        k = self.sets
        return (
            msg.sender in k.in_neighbours
            and msg.inc <= k.inc
            and msg.ninc <= k.ninc
            and msg.dec.keys() <= k.dec.keys()
            and msg.work == self.work
        )

    def handle_timer(self, now: float) -> FinnResult | None:
        if self.started and self.result is None and now >= self.deadline:
            return self._decide(complete=False)
        return None

    def _decide(self, complete: bool) -> FinnResult:
        self.sets.phase = FinnPhase.DECIDED
        decided = tuple(sorted(n for n in self.sets.dec if n != BALANCER))
        complete = complete and set(decided) == self.expected
        self.result = FinnResult(self.wave, complete, decided, sum(self.sets.dec.values()))
        return self.result
