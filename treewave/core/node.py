"""A server's protocol engine: routes wave messages to per-wave state machines.

Sans-IO: `receive(message, now, local)` and `handle_timer(now, local)` return what to
send and what to do; `local` is the server's current load, supplied by the shell. Waves
are keyed by id, so any number can be in flight at once; a finished wave's id is kept for
a while so its late messages are told apart (`StaleMessage`) from unknown ones.
"""

from __future__ import annotations

from treewave.core.echo import EchoNodeWave, EchoPhase, LocalState
from treewave.core.errors import RemoteProtocolError, StaleMessage
from treewave.core.events import Output
from treewave.core.finn import FinnNodeWave, FinnPhase
from treewave.core.messages import EchoExplore, EchoReply, FinnSets, ServerState
from treewave.core.topology import Topology

__all__ = ["FINISHED_MEMORY", "NodeProtocol"]

FINISHED_MEMORY = 4096
"""How many finished wave ids a server remembers at least (up to twice as many) to
recognise late messages."""


class NodeProtocol:
    __slots__ = (
        "children",
        "echo_neighbours",
        "echo_waves",
        "finished",
        "finn_in",
        "finn_out",
        "finn_waves",
        "name",
        "parents",
    )

    def __init__(self, name: str, topology: Topology) -> None:
        if name not in topology:
            raise ValueError(f"server {name!r} is not in the topology")
        self.name = name
        self.echo_neighbours = topology.echo_neighbours(name)
        self.finn_in = topology.finn_in(name)
        self.finn_out = topology.finn_out(name)
        self.parents = topology.parents(name)
        self.children = topology.children(name)
        self.echo_waves: dict[str, EchoNodeWave] = {}
        self.finn_waves: dict[str, FinnNodeWave] = {}
        self.finished: dict[str, None] = {}
        """Finished wave ids, oldest first (a plain dict: a simulator holds a million)."""

    def local_state(
        self,
        cpus: int,
        running: int,
        queued: int,
        completed: int,
        reserved: int = 0,
        running_left_s: tuple[float, ...] = (),
        queued_s: tuple[tuple[float, int], ...] = (),
    ) -> ServerState:
        """This server's own state, validated like any other: with pydantic 2, building a
        model through validation (in Rust) is cheaper than `model_construct` (a Python loop
        over the fields; 2.0 vs 2.7 us here), and one is built for every Echo message."""
        return ServerState(
            name=self.name,
            cpus=cpus,
            running=running,
            queued=queued,
            completed=completed,
            reserved=reserved,
            parents=self.parents,
            children=self.children,
            running_left_s=running_left_s,
            queued_s=queued_s,
            echo_parent="",
        )

    def receive(
        self,
        msg: EchoExplore | EchoReply | FinnSets,
        now: float,
        local: LocalState,
        wall_now: float | None = None,
    ) -> list[Output]:
        """Feed one validated wave message; raises a `RemoteProtocolError` (state
        unchanged) when it does not fit. `now` is the monotonic clock for deadlines,
        `wall_now` the Unix time for Finn's expiry (None: no expiry check). `local` (the
        server's state, or a function returning it) is read only by an Echo reply."""
        if msg.wave in self.finished:
            raise StaleMessage(f"wave {msg.wave} is already over at {self.name!r}")
        if isinstance(msg, FinnSets):
            return self._receive_finn(msg, now, wall_now)
        if msg.wave in self.finn_waves:
            raise RemoteProtocolError(
                f"wave {msg.wave} is a Finn wave, got {msg.type}", reason="wrong_algorithm"
            )
        wave = self.echo_waves.get(msg.wave)
        if wave is None:
            if not isinstance(msg, EchoExplore):
                raise RemoteProtocolError(
                    f"echo reply for unknown wave {msg.wave} at {self.name!r}",
                    reason="unknown_wave",
                )
            wave = EchoNodeWave(msg.wave, self.name, self.echo_neighbours, msg, now)
            self.echo_waves[msg.wave] = wave
            out: list[Output] = list(wave.start(local))
        else:
            out = list(wave.receive(msg, local))
        if wave.phase is EchoPhase.ECHOED:
            self._finish(msg.wave)
        return out

    def _receive_finn(self, msg: FinnSets, now: float, wall_now: float | None) -> list[Output]:
        if msg.wave in self.echo_waves:
            raise RemoteProtocolError(
                f"wave {msg.wave} is an Echo wave, got finn", reason="wrong_algorithm"
            )
        wave = self.finn_waves.get(msg.wave)
        if wave is None:
            wave = FinnNodeWave(msg.wave, self.name, self.finn_in, self.finn_out, msg, now)
        try:
            out = list(wave.receive(msg, now, wall_now))
        finally:
            if wave.phase is FinnPhase.EXPIRED:
                self._finish(msg.wave)
        self.finn_waves[msg.wave] = wave
        return out

    def send_failed(
        self, to: str, msg: EchoExplore | EchoReply | FinnSets, local: LocalState
    ) -> list[Output]:
        """A wave message could not go out (the shell has no link to `to`). An Echo
        explore: `to` is given up in that wave (`EchoNodeWave.unreachable`), which may
        complete it here at once. A reply or Finn's sets: nothing here can make up for
        them; the wave above ends at its deadline, partial."""
        if not isinstance(msg, EchoExplore):
            return []
        wave = self.echo_waves.get(msg.wave)
        if wave is None:
            return []
        out: list[Output] = list(wave.unreachable(to, local))
        if wave.phase is EchoPhase.ECHOED:
            self._finish(msg.wave)
        return out

    def handle_timer(self, now: float, local: LocalState) -> list[Output]:
        """Answer Echo waves past their deadline; forget Finn waves past theirs."""
        out: list[Output] = []
        for wave_id, echo in list(self.echo_waves.items()):
            out.extend(echo.handle_timer(now, local))
            if echo.phase is EchoPhase.ECHOED:
                self._finish(wave_id)
        for wave_id, finn in list(self.finn_waves.items()):
            if now >= finn.deadline:
                self._finish(wave_id)
        return out

    def next_deadline(self) -> float | None:
        deadlines = [w.deadline for w in self.echo_waves.values()]
        deadlines += [w.deadline for w in self.finn_waves.values()]
        return min(deadlines, default=None)

    def finn_sets(self, wave: str) -> tuple[int, int] | None:
        """Sizes of this server's (inc, ninc) in a Finn wave still in memory (traces)."""
        finn = self.finn_waves.get(wave)
        return None if finn is None else (len(finn.sets.inc), len(finn.sets.ninc))

    def forget(self, wave_id: str) -> None:
        """Drop a wave's state now, as if its deadline had passed: for a shell that knows
        no message of it can arrive any more (the simulator does)."""
        self._finish(wave_id)

    def _finish(self, wave_id: str) -> None:
        self.echo_waves.pop(wave_id, None)
        self.finn_waves.pop(wave_id, None)
        self.finished[wave_id] = None
        if len(self.finished) > 2 * FINISHED_MEMORY:
            # The oldest half goes at once. Deleting the oldest one at a time kept the
            # dict at its size, but its first live entry then sits behind every entry
            # deleted since it was last rebuilt, and finding it scanned them all on every
            # wave (8 % of a leaf server's time per Echo explore, bench/README.md).
            newest = list(self.finished)[-FINISHED_MEMORY:]
            self.finished = dict.fromkeys(newest)
