"""The balancer's rules, sans-IO: waves in flight, the values derived from the topology and
the settings, rebalancing rounds, drain driving and transfer bookkeeping.

Like the node's `NodeProtocol`, it takes frames (`receive`), the clock (`handle_timer`),
and the API's commands (`start_echo`, `start_finn`, `submit`, `start_rebalance`,
`start_transfer`, `adopt`), and returns effects (`core.balancer.effects`) for the asyncio
shell to carry out. `now` is `time.monotonic()`; `wall_now` (`time.time()`) is passed
where a rule needs the wall clock (a Finn wave's expiry, the migration's persisted grace
deadlines). Every value derived from the topology and the settings is computed in one
place, `_derive`, called whenever a topology is adopted.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque

from treewave.core.balancer.effects import (
    DrainMoved,
    Effect,
    RemoteError,
    RoundFinished,
    SaveState,
    SendTo,
    ServerRetired,
    ShowMigration,
    SubmissionConfirmed,
    SubmissionTimedOut,
    TraceArrived,
    TransferFinished,
    TransferSettled,
    WaveFinished,
    WaveOutcome,
    WaveStarted,
)
from treewave.core.balancer.records import DrainMove, Round, RoundPhase, WaveInFlight
from treewave.core.deadlines import wave_deadline_s
from treewave.core.echo import EchoInitiator
from treewave.core.errors import LocalProtocolError, RemoteProtocolError, StaleMessage
from treewave.core.events import EchoResult, FinnResult
from treewave.core.finn import FinnInitiator
from treewave.core.ledger import TRANSFER_REPLIES, TransferRequest
from treewave.core.messages import (
    DrainReport,
    DrainRequest,
    EchoExplore,
    EchoReply,
    ErrorReply,
    FinnSets,
    FinnWork,
    Message,
    SubmitTasks,
    Task,
    TasksAccepted,
    TracePart,
    TraceParts,
)
from treewave.core.migration import (
    HoldServer,
    Intent,
    Migration,
    MigrationPhase,
    MoveQueued,
    ReleaseServer,
    RequeueRunning,
    Retired,
    ServerReport,
    TargetLoads,
)
from treewave.core.migration import TransferDone as MoveDone
from treewave.core.policies import Policy, get_policy
from treewave.core.policy import loads_of
from treewave.core.precedence import SettingOverrides, effective_settings
from treewave.core.topology import Settings, Topology
from treewave.core.transfer import (
    TransferCoordinator,
    TransferDone,
    TransferOutput,
    TransferResult,
    TransferSend,
)

__all__ = [
    "LINK_WAIT_S",
    "RETRY_S",
    "BalancerMachine",
    "CommandRefused",
    "RoundPhase",
    "hop_budget_s",
]

RETRY_S = 1.0
"""How soon an unanswered transfer resolution step is sent again."""
LINK_WAIT_S = 5.0
"""How long a drain move waits for its servers' links (an added server is still dialled)."""


def hop_budget_s(deadline_s: float, depth: int) -> float:
    """An Echo's per-hop budget step: a quarter of the deadline per (depth + 2) hops
    leaves room for spanning-tree paths longer than the topology's depth."""
    return deadline_s / (4 * (depth + 2))


class CommandRefused(LocalProtocolError):
    """An API command the machine refuses; nothing changed. `reason`: "unknown" (not a
    server of the topology) or "retiring" (leaving it: it takes no new work)."""

    def __init__(self, message: str, reason: str, server: str) -> None:
        super().__init__(message, reason)
        self.server = server


class BalancerMachine:
    """The balancer's side of every protocol (see the module docstring)."""

    def __init__(
        self,
        migration: Migration,
        overrides: SettingOverrides,
        instance: str,
        step_timeout_s: float,
        now: float,
        wall_now: float,
    ) -> None:
        self.migration = migration
        self.overrides = overrides
        self.instance = instance
        self.step_timeout_s = step_timeout_s
        self.coordinator = TransferCoordinator((), instance, step_timeout_s, RETRY_S)
        self.waves: dict[str, WaveInFlight] = {}
        self.submissions: dict[str, tuple[str, float]] = {}
        """First task id -> (server, when the confirmation is overdue)."""
        self.round: Round | None = None
        self.queued_rounds: deque[str] = deque()
        """API rounds asked for while another ran (they run one after the other)."""
        self.round_soon = False
        """New work arrived during a round: the next periodic round starts right after it."""
        self.next_round_at: float | None = None
        self._round_base = now
        """When the rebalancing interval counts from (start, or the last round's end)."""
        self.links_up: set[str] = set()
        self.waiting_moves: list[DrainMove] = []
        self.drain_transfers: dict[str, MoveQueued] = {}
        self.pending_moves: Counter[str] = Counter()
        """Drain moves not started yet, by source and target (they count as unsettled)."""
        self._wall_offset = wall_now - now
        self._ids = itertools.count(1)
        self.topology = migration.topology
        self._derive(now)

    # --- derived values: the one place --------------------------------------------------

    def _derive(self, now: float) -> None:
        """Every value that follows from the topology and the settings."""
        topology = self.topology
        self.settings: Settings = effective_settings(topology.settings, self.overrides)
        self.names = frozenset(topology.names)
        self.wave_timeout_s = self.settings.wave_timeout_s
        self.wave_deadline_s = wave_deadline_s(
            self.wave_timeout_s, topology.depth, len(topology.servers)
        )
        """Every wave's deadline: the setting, grown with the tree's depth and size."""
        self.hop_s = hop_budget_s(self.wave_deadline_s, topology.depth)
        self.rebalance_interval_s = self.settings.rebalance_interval_s
        self.policy: Policy = get_policy(self.settings.policy)
        self.coordinator.set_servers(self.linked_names)
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        if self.rebalance_interval_s <= 0:
            self.next_round_at = None
        elif self.round_soon and self.round is None:
            self.next_round_at = now
        else:
            self.next_round_at = self._round_base + self.rebalance_interval_s

    @property
    def linked_names(self) -> tuple[str, ...]:
        """Every server the balancer keeps a link to: the topology's, and those retiring or
        being released (they still hold tasks, or must be told to take work again)."""
        extra = (self.migration.retiring | self.migration.releasing) - self.names
        return (*self.topology.names, *sorted(extra))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self.instance}-{next(self._ids)}"

    # --- commands -----------------------------------------------------------------------

    def adopt(
        self,
        desired: Topology,
        now: float,
        wall_now: float,
        overrides: SettingOverrides | None = None,
    ) -> tuple[bool, list[Effect]]:
        """Make `desired` the topology (and `overrides` the flags/environment, if given):
        start or supersede the migration to it and derive every value anew. False (and
        nothing) when neither changes."""
        self._wall_offset = wall_now - now
        same = desired.to_json_data() == self.topology.to_json_data()
        if same and (overrides is None or overrides == self.overrides):
            return False, []
        if overrides is not None:
            self.overrides = overrides
        intents = self.migration.adopt(desired, wall_now)
        self.topology = desired
        self._derive(now)
        return True, [SaveState(), *self._carry_out(intents, now)]

    def start_echo(
        self, trigger: str, now: float, round_id: str | None = None
    ) -> tuple[str, list[Effect]]:
        wave = self.new_id("echo")
        init = EchoInitiator(wave, self.topology.root, self.names)
        sends = init.start(now, self.wave_deadline_s, self.hop_s)
        self.waves[wave] = WaveInFlight(
            init, trigger, now, self.wave_deadline_s, self.names, round_id
        )
        return wave, [WaveStarted(init, tuple(sends)), *(SendTo(s.to, s.message) for s in sends)]

    def start_finn(self, work: FinnWork, now: float, wall_now: float) -> tuple[str, list[Effect]]:
        wave = self.new_id("finn")
        init = FinnInitiator(wave, self.topology.root, self.topology.leaves, self.names, work)
        sends = init.start(now, self.wave_deadline_s, wall_now + self.wave_deadline_s)
        self.waves[wave] = WaveInFlight(init, "api", now, self.wave_deadline_s, self.names)
        return wave, [WaveStarted(init, tuple(sends)), *(SendTo(s.to, s.message) for s in sends)]

    def submit(
        self,
        node: str,
        count: int,
        duration_s: float | None,
        actual_s: float | None,
        now: float,
    ) -> tuple[list[str], list[Effect]]:
        """Queue `count` new tasks at `node`: answered by `SubmissionConfirmed` or, after
        the step timeout, `SubmissionTimedOut`."""
        if node in self.migration.retiring:
            raise CommandRefused(
                f"server {node!r} is retiring (not in the current topology); it takes no new "
                "tasks, nothing was queued",
                "retiring",
                node,
            )
        if node not in self.names:
            raise CommandRefused(f"unknown server {node!r}", "unknown", node)
        duration = duration_s or self.settings.task_time_s
        batch = self.new_id("t")
        tasks = tuple(
            Task(id=f"{batch}.{i}", duration_s=duration, actual_s=actual_s) for i in range(count)
        )
        self.submissions[tasks[0].id] = (node, now + self.step_timeout_s)
        return [t.id for t in tasks], [SendTo(node, SubmitTasks(tasks=tasks))]

    def forget_submission(self, first: str) -> None:
        """The submission could not be sent: nobody waits for its confirmation."""
        self.submissions.pop(first, None)

    def start_rebalance(self, now: float, periodic: bool = False) -> tuple[str, list[Effect]]:
        """A rebalancing round (answered by `RoundFinished`); one runs at a time, so a
        round asked for during another starts when it ends."""
        round_id = self.new_id("round")
        if self.round is not None:
            self.queued_rounds.append(round_id)
            return round_id, []
        return round_id, self._begin_round(round_id, periodic, now)

    def start_transfer(
        self,
        source: str,
        target: str,
        count: int,
        now: float,
        durations: tuple[float, ...] | None = None,
    ) -> tuple[str, list[Effect]]:
        """A two-phase transfer, registered at once (it counts as unsettled for both
        servers from now on); answered by exactly one `TransferFinished`."""
        tid, out = self.coordinator.start(source, target, count, now, durations)
        return tid, self._transfer_effects(out, now)

    # --- links --------------------------------------------------------------------------

    def link_up(self, server: str, now: float) -> list[Effect]:
        """A server (re)connected: ask for reservations we may have lost track of, and
        start the drain moves that waited for its link."""
        self.links_up.add(server)
        effects = self._transfer_effects(self.coordinator.link_up(server, now), now)
        return effects + self._start_ready_moves(now)

    def send_failed(self, to: str, message: Message, now: float) -> list[Effect]:
        """A send could not go out (no link)."""
        self.links_up.discard(to)
        if isinstance(message, (EchoExplore, FinnSets)):
            # The root is unreachable: nothing can answer, so the wave ends at once.
            wave = self.waves.get(message.wave)
            if wave is None:
                return []
            result = wave.initiator.handle_timer(float("inf"))
            return [] if result is None else self._wave_decided(result, now)
        if isinstance(message, TransferRequest):
            return self._transfer_effects(self.coordinator.unreachable(to, now), now)
        return []

    # --- frames -------------------------------------------------------------------------

    def receive(self, peer: str, msg: Message, now: float, wall_now: float) -> list[Effect]:
        """One validated frame from `peer`; raises `ProtocolError`s (nothing changed)."""
        self._wall_offset = wall_now - now
        if isinstance(msg, (EchoExplore, EchoReply, FinnSets)):
            return self._wave_message(peer, msg, now)
        if isinstance(msg, TracePart):
            return [TraceArrived(peer, msg)]
        if isinstance(msg, TraceParts):
            return [TraceArrived(peer, part) for part in msg.parts]
        if isinstance(msg, TRANSFER_REPLIES):
            return self._transfer_effects(self.coordinator.receive(msg, now, peer), now)
        if isinstance(msg, TasksAccepted):
            if self.submissions.pop(msg.first, None) is None:
                raise StaleMessage(f"unexpected {msg.type} for {msg.first}")
            self._soon(now)
            return [SubmissionConfirmed(msg.first, msg)]
        if isinstance(msg, DrainReport):
            return self._drain_report(peer, msg, now, wall_now)
        if isinstance(msg, ErrorReply):
            return [RemoteError(peer, msg.error)]
        raise RemoteProtocolError(f"{msg.type} is not something servers send", "unexpected_type")

    def _wave_message(
        self, peer: str, msg: EchoExplore | EchoReply | FinnSets, now: float
    ) -> list[Effect]:
        if msg.sender != peer:
            raise RemoteProtocolError(
                f"{peer!r} sent a message claiming to be from {msg.sender!r}",
                reason="sender_mismatch",
            )
        wave = self.waves.get(msg.wave)
        if wave is None:
            raise StaleMessage(f"wave {msg.wave} is not in flight")
        init = wave.initiator
        result: EchoResult | FinnResult | None
        if isinstance(init, EchoInitiator):
            if isinstance(msg, FinnSets):
                raise RemoteProtocolError("finn message in an echo wave", "wrong_algorithm")
            result = init.receive(msg, now)
        else:
            if not isinstance(msg, FinnSets):
                raise RemoteProtocolError("echo message in a finn wave", "wrong_algorithm")
            result = init.receive(msg, now)
        return [] if result is None else self._wave_decided(result, now)

    def _wave_decided(self, result: EchoResult | FinnResult, now: float) -> list[Effect]:
        wave = self.waves.pop(result.wave)
        periodic = self.round is not None and self.round.periodic
        if isinstance(result, EchoResult):
            outcome = WaveOutcome(
                wave_id=result.wave,
                algorithm="echo",
                trigger=wave.trigger,
                complete=result.complete,
                missing=tuple(sorted(wave.expected - {s.name for s in result.states})),
                messages=result.messages,
                duration_s=now - wave.started,
                deadline_s=wave.deadline_s,
                states=result.states,
                periodic=wave.round_id is not None and periodic,
            )
            if result.states and self.migration.phase is MigrationPhase.DRAINING:
                # Drained tasks go where the new topology has least pressure.
                loads = loads_of(result.states, self.settings.task_time_s)
                self.migration.receive(TargetLoads(tuple(loads)), now + self._wall_offset)
        else:
            outcome = WaveOutcome(
                wave_id=result.wave,
                algorithm="finn",
                trigger=wave.trigger,
                complete=result.complete,
                missing=tuple(sorted(wave.expected - set(result.decided))),
                messages=result.messages,
                duration_s=now - wave.started,
                deadline_s=wave.deadline_s,
                decided=result.decided,
            )
        effects: list[Effect] = [WaveFinished(outcome)]
        if wave.round_id is not None:
            effects += self._round_wave(wave.round_id, outcome, now)
        return effects

    # --- rebalancing rounds -------------------------------------------------------------

    def _soon(self, now: float) -> None:
        """New work arrived: rebalance at once, not at the next tick (only when periodic
        rebalancing is on); during a round, right after it."""
        if self.rebalance_interval_s <= 0:
            return
        if self.round is None:
            self.next_round_at = now
        else:
            self.round_soon = True

    def _begin_round(self, round_id: str, periodic: bool, now: float) -> list[Effect]:
        self.round = Round(round_id, periodic, policy=self.policy.name)
        _, effects = self.start_echo("rebalance", now, round_id)
        return effects

    def _round_wave(self, round_id: str, outcome: WaveOutcome, now: float) -> list[Effect]:
        r = self.round
        if r is None or r.round_id != round_id:
            return []
        if r.phase is RoundPhase.AFTER:
            return self._end_round(r, outcome, now)
        r.before = outcome
        loads = loads_of(outcome.states, self.settings.task_time_s)
        r.policy = self.policy.name
        r.planned = tuple(self.policy.plan(loads, self.settings))
        r.moved = [0] * len(r.planned)
        r.phase = RoundPhase.MOVING
        effects: list[Effect] = []
        for i, m in enumerate(r.planned):
            try:
                tid, out = self.coordinator.start(m.source, m.target, m.tasks, now, m.durations)
            except LocalProtocolError:
                continue  # a server the snapshot named left meanwhile: nothing moves
            r.transfers[tid] = i
            effects += self._transfer_effects(out, now)
        if self.round is r and r.phase is RoundPhase.MOVING and not r.transfers:
            effects += self._after_moves(r, now)
        return effects

    def _after_moves(self, r: Round, now: float) -> list[Effect]:
        assert r.before is not None
        if not r.planned:
            return self._end_round(r, r.before, now)
        r.phase = RoundPhase.AFTER
        _, effects = self.start_echo("rebalance", now, r.round_id)
        return effects

    def _end_round(self, r: Round, after: WaveOutcome, now: float) -> list[Effect]:
        assert r.before is not None
        self.round = None
        self._round_base = now
        done = RoundFinished(
            r.round_id, r.periodic, r.policy, r.before, after, r.planned, tuple(r.moved)
        )
        effects: list[Effect] = [done]
        if self.queued_rounds:
            effects += self._begin_round(self.queued_rounds.popleft(), False, now)
        self._schedule(now)
        self.round_soon = False
        return effects

    # --- transfers ----------------------------------------------------------------------

    def _transfer_effects(self, outputs: list[TransferOutput], now: float) -> list[Effect]:
        effects: list[Effect] = []
        for item in outputs:
            if isinstance(item, TransferSend):
                effects.append(SendTo(item.to, item.message))
            elif isinstance(item, TransferResult):
                effects.append(TransferFinished(item.transfer, item.moved, item.outcome))
                effects += self._transfer_result(item, now)
            elif isinstance(item, TransferDone):
                effects.append(TransferSettled(item.transfer, item.outcome, item.moved))
        return effects

    def _transfer_result(self, item: TransferResult, now: float) -> list[Effect]:
        r = self.round
        if r is not None and item.transfer in r.transfers:
            r.moved[r.transfers.pop(item.transfer)] = item.moved
            return [] if r.transfers else self._after_moves(r, now)
        move = self.drain_transfers.pop(item.transfer, None)
        if move is not None:
            return self._drain_move_done(move, item.moved, now)
        return []

    # --- drain --------------------------------------------------------------------------

    def _drain_report(
        self, peer: str, msg: DrainReport, now: float, wall_now: float
    ) -> list[Effect]:
        """A server's answer to a `DrainRequest`, with the transfers it is part of that are
        not settled yet (it must not retire while any is)."""
        report = ServerReport(
            server=peer,
            held=msg.held,
            queued=msg.queued,
            running=msg.running,
            reserved=msg.reserved,
            completed=msg.completed,
            transferred_out=msg.transferred_out,
            requeued=msg.requeued,
            answers=msg.answers,
            in_doubt=self.coordinator.involving(peer) + self.pending_moves[peer],
        )
        intents = self.migration.receive(report, wall_now)
        return [SaveState(), *self._carry_out(intents, now)]

    def _carry_out(self, intents: list[Intent], now: float) -> list[Effect]:
        effects: list[Effect] = []
        for intent in intents:
            if isinstance(intent, HoldServer):
                effects.append(SendTo(intent.server, DrainRequest(hold=True, seq=intent.seq)))
            elif isinstance(intent, RequeueRunning):
                request = DrainRequest(hold=True, requeue_running=True, seq=intent.seq)
                effects.append(SendTo(intent.server, request))
            elif isinstance(intent, ReleaseServer):
                effects.append(SendTo(intent.server, DrainRequest(hold=False, seq=intent.seq)))
            elif isinstance(intent, MoveQueued):
                # Counted at once, not when the transfer starts: a report of either server
                # that arrives before it starts must see it as unsettled.
                self.pending_moves.update((intent.source, intent.target))
                self.waiting_moves.append(DrainMove(intent, now + LINK_WAIT_S))
            elif isinstance(intent, Retired):
                effects += self._retire(intent.server)
        return effects + self._start_ready_moves(now)

    def _start_ready_moves(self, now: float) -> list[Effect]:
        """Start the drain moves whose servers are both linked, or that waited long
        enough (an added server may not be linked yet: a little patience rather than a
        transfer in doubt at once)."""
        effects: list[Effect] = []
        waiting, self.waiting_moves = self.waiting_moves, []
        for w in waiting:
            m = w.move
            linked = m.source in self.links_up and m.target in self.links_up
            if not linked and now < w.wait_until:
                self.waiting_moves.append(w)
                continue
            self.pending_moves.subtract((m.source, m.target))
            try:
                tid, out = self.coordinator.start(m.source, m.target, m.count, now)
            except LocalProtocolError:
                effects += self._drain_move_done(m, 0, now)
                continue
            self.drain_transfers[tid] = m
            effects += self._transfer_effects(out, now)
        return effects

    def _drain_move_done(self, move: MoveQueued, moved: int, now: float) -> list[Effect]:
        effects: list[Effect] = [DrainMoved(move.source, move.target, moved)]
        try:
            intents = self.migration.receive(
                MoveDone(move.source, move.target, moved), now + self._wall_offset
            )
        except StaleMessage:  # superseded meanwhile
            return effects
        return [*effects, SaveState(), *self._carry_out(intents, now)]

    def _retire(self, name: str) -> list[Effect]:
        """It holds nothing: no link, no transfers, in nothing from now on."""
        if name in self.names:
            # Carried out after a newer topology brought it back: stale (it is released).
            return []
        self.coordinator.set_servers(self.linked_names)
        self.links_up.discard(name)
        return [ServerRetired(name), SaveState()]

    # --- time ---------------------------------------------------------------------------

    def handle_timer(self, now: float, wall_now: float) -> list[Effect]:
        """Decide waves past their deadline; time out or retry transfer steps and
        submissions; drive the drain; start the periodic round when it is due."""
        # The migration's deadlines are wall-clock times, converted with the offset that
        # `next_deadline` used: due by that, it runs at its own deadline at the earliest
        # (the two clocks are read at different instants, and a timer that fires but
        # does nothing would fire again at once).
        migration_due = self.migration.next_deadline()
        migration_wall: float | None = None
        if migration_due is not None and now >= migration_due - self._wall_offset:
            migration_wall = max(wall_now, migration_due)
        self._wall_offset = wall_now - now
        effects: list[Effect] = []
        for wave in list(self.waves.values()):
            result = wave.initiator.handle_timer(now)
            if result is not None:
                effects += self._wave_decided(result, now)
        effects += self._transfer_effects(self.coordinator.handle_timer(now), now)
        for first, (_, overdue) in list(self.submissions.items()):
            if now >= overdue:
                del self.submissions[first]
                effects.append(SubmissionTimedOut(first))
        effects += self._start_ready_moves(now)
        if migration_wall is not None:
            intents = self.migration.handle_timer(migration_wall)
            # Only re-sent requests (their numbers unchanged): nothing new to save.
            effects += [ShowMigration(), *self._carry_out(intents, now)]
        if self.next_round_at is not None and now >= self.next_round_at and self.round is None:
            self.next_round_at = None
            _, started = self.start_rebalance(now, periodic=True)
            effects += started
        return effects

    def next_deadline(self) -> float | None:
        """The earliest `now` at which `handle_timer` has something to do."""
        times = [w.initiator.deadline for w in self.waves.values()]
        times += [overdue for _, overdue in self.submissions.values()]
        times += [w.wait_until for w in self.waiting_moves]
        transfers = self.coordinator.next_deadline()
        if transfers is not None:
            times.append(transfers)
        migration = self.migration.next_deadline()
        if migration is not None:
            times.append(migration - self._wall_offset)
        if self.next_round_at is not None and self.round is None:
            times.append(self.next_round_at)
        return min(times, default=None)
