"""An in-memory network that runs the real state machines, for tests and big simulations.

Every message sent goes into one in-flight pool; `deliver(i)` hands the i-th to its
receiver, so a test (or a seeded random generator) picks any delivery order. Servers'
loads are plain counters: a Finn decision adds its tasks to the server's queue.
With `trace=True` every participant records its part of each wave as the real services
do (the simulated clock is everyone's clock), and `trace(wave)` assembles it.

With `release=True` (what `treewave simulate` uses for a million servers) a server's part
in a Finn wave is dropped as soon as no message of the wave can reach it any more: it has
decided (so every in-neighbour decided before it and sends nothing more) and no message
to it is in flight. A real server keeps it until the wave's deadline, since it cannot
know; the simulator can, and a million decided servers' sets would otherwise be held
until the end of the run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from treewave.core.echo import EchoInitiator
from treewave.core.events import EchoResult, FinnDecided, FinnResult, Send
from treewave.core.finn import FinnInitiator, FinnPhase
from treewave.core.messages import (
    EchoExplore,
    EchoReply,
    FinnSets,
    FinnWork,
    ServerState,
    trusted,
)
from treewave.core.node import NodeProtocol
from treewave.core.topology import BALANCER, Topology
from treewave.core.trace import TraceJson, TraceRecorder, assemble

__all__ = ["SimNetwork", "SimServer", "WaveLog"]


@dataclass(slots=True)
class SimServer:
    protocol: NodeProtocol
    cpus: int
    running: int = 0
    queued: int = 0
    completed: int = 0
    decisions: list[str] = field(default_factory=list)
    """Finn waves this server decided, in order."""
    inbound: int = 0
    """Messages in flight to this server (counted with `release=True` only)."""

    def state(self) -> ServerState:
        """This server's state, as `NodeProtocol.local_state` makes it but unvalidated:
        the counts are the simulator's own (one is built per server and Echo wave)."""
        p = self.protocol
        return trusted(
            ServerState,
            name=p.name,
            cpus=self.cpus,
            running=self.running,
            queued=self.queued,
            completed=self.completed,
            parents=p.parents,
            children=p.children,
        )


@dataclass
class WaveLog:
    """What happened to one wave in the simulation."""

    wave: str
    algorithm: str
    messages: int = 0
    participants: set[str] = field(default_factory=set)
    decide_order: list[str] = field(default_factory=list)
    """Who decided, in order (Finn: servers then the balancer; Echo: the balancer)."""
    sent_after_decision: int = 0
    result: EchoResult | FinnResult | None = None


class SimNetwork:
    def __init__(
        self, topology: Topology, now: float = 0.0, trace: bool = False, release: bool = False
    ) -> None:
        self.topology = topology
        self.now = now
        self.release = release
        self.servers = {
            s.name: SimServer(NodeProtocol(s.name, topology), s.cpus, queued=s.tasks)
            for s in topology.servers
        }
        self.in_flight: list[tuple[str, str, EchoExplore | EchoReply | FinnSets]] = []
        """(sender, receiver, message) not yet delivered."""
        self.echo: dict[str, EchoInitiator] = {}
        self.finn: dict[str, FinnInitiator] = {}
        self.logs: dict[str, WaveLog] = {}
        self._expected = frozenset(topology.names)
        self.recorders: dict[str, TraceRecorder] = (
            {n: TraceRecorder(n, max_waves=1_000_000) for n in (BALANCER, *topology.names)}
            if trace
            else {}
        )

    # --- starting waves --------------------------------------------------------------------

    def start_echo(self, wave: str, budget_s: float = 3600.0, hop_s: float | None = None) -> None:
        init = EchoInitiator(wave, self.topology.root, self._expected)
        self.echo[wave] = init
        self.logs[wave] = WaveLog(wave, "echo")
        self._post(BALANCER, init.start(self.now, budget_s, hop_s))

    def start_finn(self, wave: str, work: FinnWork, budget_s: float = 3600.0) -> None:
        init = FinnInitiator(wave, self.topology.root, self.topology.leaves, self._expected, work)
        self.finn[wave] = init
        self.logs[wave] = WaveLog(wave, "finn")
        self._post(BALANCER, init.start(self.now, budget_s))

    # --- delivering ------------------------------------------------------------------------

    def deliver(self, index: int) -> None:
        """Deliver the in-flight message at `index` (swap-remove: O(1))."""
        pool = self.in_flight
        last = pool.pop()
        if index < len(pool):
            sender, to, msg = pool[index]
            pool[index] = last
        else:
            sender, to, msg = last
        log = self.logs[msg.wave]
        if to == BALANCER:
            self._to_balancer(sender, msg)
            return
        server = self.servers[to]
        log.participants.add(to)
        protocol = server.protocol
        # The state is built only if the server replies (an Echo reply reads it).
        out = protocol.receive(msg, self.now, server.state)
        recorder = self.recorders.get(to) if self.recorders else None
        if recorder is not None:
            recorder.received(sender, msg, self.now, protocol.finn_sets(msg.wave))
        sends: list[Send] = []
        for item in out:
            if isinstance(item, FinnDecided):
                server.decisions.append(item.wave)
                server.queued += item.work.tasks_per_node
                log.decide_order.append(to)
                if recorder is not None:
                    recorder.decided(item.wave, self.now, protocol.finn_sets(item.wave))
            else:
                sends.append(item)
        if self.release:
            server.inbound -= 1
            if server.inbound == 0 and isinstance(msg, FinnSets):
                finn = protocol.finn_waves.get(msg.wave)
                if finn is not None and finn.phase is FinnPhase.DECIDED:
                    protocol.forget(msg.wave)
        if not sends:
            return
        if recorder is not None:
            for s in sends:
                recorder.sent(s.to, s.message, self.now)
        # One receipt sends messages of its own wave only.
        log.messages += len(sends)
        if log.result is not None:
            log.sent_after_decision += len(sends)
        if self.release:
            servers = self.servers
            for s in sends:
                if s.to != BALANCER:
                    servers[s.to].inbound += 1
        pool.extend([(to, s.to, s.message) for s in sends])

    def _to_balancer(self, sender: str, msg: EchoExplore | EchoReply | FinnSets) -> None:
        known: tuple[int, int] | None = None
        if isinstance(msg, FinnSets):
            finn = self.finn[msg.wave]
            result: EchoResult | FinnResult | None = finn.receive(msg)
            known = (len(finn.sets.inc), len(finn.sets.ninc))
        else:
            result = self.echo[msg.wave].receive(msg)
        recorder = self.recorders.get(BALANCER)
        if recorder is not None:
            recorder.received(sender, msg, self.now, known)
        if result is not None:
            self._decided(result)

    def _post(self, sender: str, sends: list[Send]) -> None:
        recorder = self.recorders.get(sender)
        for s in sends:
            if recorder is not None:
                recorder.sent(s.to, s.message, self.now)
            log = self.logs[s.message.wave]
            log.messages += 1
            if log.result is not None:
                log.sent_after_decision += 1
            if self.release and s.to != BALANCER:
                self.servers[s.to].inbound += 1
            self.in_flight.append((sender, s.to, s.message))

    def advance(self, now: float) -> None:
        """Move the clock and fire every timer that is due."""
        self.now = now
        for name, server in self.servers.items():
            out = server.protocol.handle_timer(now, server.state())
            self._post(name, [s for s in out if isinstance(s, Send)])
        results: list[EchoResult | FinnResult | None] = [
            e.handle_timer(now) for e in self.echo.values()
        ]
        results += [f.handle_timer(now) for f in self.finn.values()]
        for result in results:
            if result is not None:
                self._decided(result)

    def _decided(self, result: EchoResult | FinnResult) -> None:
        log = self.logs[result.wave]
        log.result = result
        log.decide_order.append(BALANCER)
        recorder = self.recorders.get(BALANCER)
        if recorder is not None:
            sets: tuple[int, int] | None = None
            finn = self.finn.get(result.wave)
            if finn is not None:
                sets = (len(finn.sets.inc), len(finn.sets.ninc))
            recorder.decided(result.wave, self.now, sets)

    def trace(self, wave: str) -> TraceJson:
        """The wave's trace, put together like the balancer does (needs `trace=True`)."""
        if not self.recorders:
            raise ValueError("this network was made without trace=True")
        log = self.logs[wave]
        parts = {name: r.events(wave) for name, r in self.recorders.items() if r.events(wave)}
        complete = log.result is not None and log.result.complete
        missing: set[str] = set()
        if isinstance(log.result, EchoResult):
            missing = set(self._expected) - {s.name for s in log.result.states}
        elif isinstance(log.result, FinnResult):
            missing = set(self._expected) - set(log.result.decided)
        return assemble(
            wave,
            log.algorithm,
            parts,
            lanes=(BALANCER, *self.topology.names),
            wave_complete=complete,
            wave_missing=missing,
        )

    def run(self, rng: random.Random, drop: set[str] | None = None) -> None:
        """Deliver in random order until nothing is in flight. Messages to servers in
        `drop` vanish (a dead server)."""
        while self.in_flight:
            i = rng.randrange(len(self.in_flight))
            if drop and self.in_flight[i][1] in drop:
                pool = self.in_flight
                pool[i], pool[-1] = pool[-1], pool[i]
                pool.pop()
                continue
            self.deliver(i)

    def run_quiet(self, rng: random.Random) -> None:
        """`run` without drops, cheaper per message (a million servers send millions):
        the index is drawn as `int(random() * n)`, another seeded order than `run`'s."""
        pool = self.in_flight
        deliver = self.deliver
        uniform = rng.random
        while pool:
            deliver(int(uniform() * len(pool)))
