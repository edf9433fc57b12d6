"""Traces of waves, sans-IO: what each participant records, and the whole wave put together.

Each participant (every server and the balancer) keeps a `TraceRecorder`: its own sends,
receives and decisions per wave, with its own clock, in a bounded buffer. Nothing is added
to the wave's messages. After a wave the balancer gathers the parts (`TracePart`, on its
direct links) and `assemble` puts them together: it matches every receive to its send (per
directed link, first unmatched send with the same content, which is FIFO order on one
link), orders all events consistently with causality and computes a **vector clock** for
each, so the order is right even when the hosts' clocks disagree. A participant whose part
is missing leaves the trace partial, and says so.

`shiviz_file` writes one or more traces as a file ShiViz's "Choose file" upload opens as it
is: its first line the parser regex, its second the execution delimiter, then each wave as
one execution (`shiviz_log`) under a delimiter line naming it.
"""

from __future__ import annotations

import heapq
import json
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from treewave.core.messages import (
    MAX_PARTS_PER_FRAME,
    EchoExplore,
    EchoReply,
    FinnSets,
    TraceEvent,
    TracePart,
    TraceParts,
    TraceRow,
    rows_to_events,
    trusted,
)

__all__ = [
    "DEFAULT_EVENTS_PER_WAVE",
    "EVENTS_PER_FRAME",
    "SHIVIZ_DEFAULT_PARSER",
    "SHIVIZ_DELIMITER",
    "TraceJson",
    "TraceRecorder",
    "assemble",
    "message_kind",
    "shiviz_file",
    "shiviz_log",
]

DEFAULT_EVENTS_PER_WAVE = 5_000
"""A participant stops recording a wave after this many events (and marks it truncated).
A server sends and receives about twice its degree in an Echo wave and a few messages per
in- and out-neighbour in a Finn wave, so this only cuts off pathological waves; it keeps a
server's buffer of 64 waves below 64 x 5,000 events (37 MiB: bench/trace_overhead.py)."""

EVENTS_PER_FRAME = 20_000
"""`push_frames` starts a new frame past this many events (about 3 MiB of JSON, well
under a frame's 8 MiB limit)."""

SHIVIZ_DEFAULT_PARSER = r"(?<event>.*)\n(?<host>\S*) (?<clock>{.*})"
"""ShiViz's default log parser (`defaultParser` in its js/shiviz.js), which
`shiviz_log` writes for: one line describing the event, one with host and vector clock."""

SHIVIZ_DELIMITER = r"=== wave (?<trace>\S+) ==="
"""The line before each wave in a ShiViz file: ShiViz splits the log into executions at
the lines it matches (compiled with the "m" flag) and labels each with its `trace` group.
It matches no event line (they never start with "===")."""

WaveMessage = EchoExplore | EchoReply | FinnSets
TraceJson = dict[str, Any]


def message_kind(msg: WaveMessage) -> Literal["explore", "reply", "finn"]:
    if isinstance(msg, EchoExplore):
        return "explore"
    if isinstance(msg, EchoReply):
        return "reply"
    return "finn"


@dataclass
class _WaveBuffer:
    events: list[TraceRow] = field(default_factory=list)
    """Each event as a part carries it: a plain tuple takes a fifth of the memory of a
    `TraceEvent`, which is only built when a trace is assembled."""
    truncated: bool = False
    done: bool = False
    """This participant finished its part: its part is pushed (and pushed again on any
    later event)."""


class TraceRecorder:
    """One participant's recent waves, event by event. Bounded: at most `max_waves` waves
    (the oldest is forgotten first) of at most `events_per_wave` events each;
    `max_waves=0` records nothing."""

    def __init__(
        self, name: str, max_waves: int = 64, events_per_wave: int = DEFAULT_EVENTS_PER_WAVE
    ) -> None:
        if max_waves < 0 or events_per_wave < 1:
            raise ValueError("max_waves must be >= 0 and events_per_wave >= 1")
        self.name = name
        self.max_waves = max_waves
        self.events_per_wave = events_per_wave
        self.waves: OrderedDict[str, _WaveBuffer] = OrderedDict()
        self.due: set[str] = set()
        """Finished waves with events not pushed yet (`take_due`)."""

    @property
    def enabled(self) -> bool:
        return self.max_waves > 0

    def sent(self, to: str, msg: WaveMessage, at: float) -> None:
        self._add(msg.wave, "send", msg, to, at, None)

    def received(
        self, sender: str, msg: WaveMessage, at: float, known: tuple[int, int] | None = None
    ) -> None:
        """`known`: Finn only, the receiver's own (inc, ninc) sizes after merging."""
        self._add(msg.wave, "receive", msg, sender, at, known)

    def decided(self, wave: str, at: float, sets: tuple[int, int] | None = None) -> None:
        """`sets`: Finn only, the decider's (inc, ninc) sizes."""
        inc, ninc = sets if sets is not None else (None, None)
        self._keep(wave, ("decide", "", "", at, inc, ninc, None, None, None))

    def done(self, wave: str) -> None:
        """This participant finished its part of `wave` (an Echo server replied to its
        parent, a Finn server decided): its part is due to be pushed, and again after any
        later event of the wave (a Finn message still in flight when it decided)."""
        buf = self.waves.get(wave)
        if buf is not None:
            buf.done = True
            self.due.add(wave)

    def take_due(self) -> list[TracePart]:
        """The parts due (`done`), each whole, marked pushed; empty when none is."""
        if not self.due:
            return []
        parts = [self.part(wave, pushed=True) for wave in self.due if wave in self.waves]
        self.due.clear()
        return parts

    def push_frames(self) -> list[TracePart | TraceParts]:
        """The parts due, batched: as few frames as fit (`EVENTS_PER_FRAME`), a lone part
        as itself. A server pushes these once per push window, so the waves it finished
        in that window share one frame to the balancer."""
        frames: list[TracePart | TraceParts] = []
        batch: list[TracePart] = []
        size = 0
        for part in self.take_due():
            if batch and (
                size + len(part.rows) > EVENTS_PER_FRAME or len(batch) >= MAX_PARTS_PER_FRAME
            ):
                frames.append(_frame(batch))
                batch, size = [], 0
            batch.append(part)
            size += len(part.rows)
        if batch:
            frames.append(_frame(batch))
        return frames

    def answered(self, wave: str) -> TracePart:
        """This participant's part of `wave`, asked for (`trace.request`): not pushed
        again unless more of the wave is recorded after it."""
        self.due.discard(wave)
        return self.part(wave)

    def record(self, wave: str, event: TraceEvent) -> None:
        """Keep an event as it is (its `seq` becomes the next one here)."""
        raw: TraceRow = (
            event.event,
            event.message,
            event.peer,
            event.at,
            event.inc,
            event.ninc,
            event.dec,
            event.known_inc,
            event.known_ninc,
        )
        self._keep(wave, raw)

    def _keep(self, wave: str, raw: TraceRow) -> None:
        if not self.enabled:
            return
        buf = self.waves.get(wave)
        if buf is None:
            buf = self.waves[wave] = _WaveBuffer()
            while len(self.waves) > self.max_waves:
                self.waves.popitem(last=False)
        if len(buf.events) >= self.events_per_wave:
            buf.truncated = True
            return
        buf.events.append(raw)
        if buf.done:
            self.due.add(wave)

    def _add(
        self,
        wave: str,
        event: Literal["send", "receive"],
        msg: WaveMessage,
        peer: str,
        at: float,
        known: tuple[int, int] | None,
    ) -> None:
        if self.max_waves <= 0:
            return
        if type(msg) is FinnSets:
            k_inc, k_ninc = known if known is not None else (None, None)
            raw: TraceRow = (
                event, "finn", peer, at, len(msg.inc), len(msg.ninc), len(msg.dec), k_inc, k_ninc
            )  # fmt: skip
        else:
            raw = (event, message_kind(msg), peer, at, None, None, None, None, None)
        buf = self.waves.get(wave)
        if buf is not None and len(buf.events) < self.events_per_wave:
            buf.events.append(raw)  # the common case, without the checks of a new wave
            if buf.done:
                self.due.add(wave)
        else:
            self._keep(wave, raw)

    def events(self, wave: str) -> tuple[TraceEvent, ...]:
        buf = self.waves.get(wave)
        return () if buf is None else rows_to_events(buf.events)

    def part(self, wave: str, pushed: bool = False) -> TracePart:
        """This participant's part of `wave` (empty if it never took part or forgot):
        its rows as recorded, nothing built per event."""
        buf = self.waves.get(wave)
        if buf is None:
            rows: tuple[TraceRow, ...] = ()
            truncated = False
        else:
            rows, truncated = tuple(buf.events), buf.truncated
        return trusted(
            TracePart, wave=wave, server=self.name, rows=rows, truncated=truncated, pushed=pushed
        )


def _frame(batch: list[TracePart]) -> TracePart | TraceParts:
    return batch[0] if len(batch) == 1 else trusted(TraceParts, parts=tuple(batch))


# --- putting a wave together -----------------------------------------------------------------


def _signature(e: TraceEvent) -> tuple[Any, ...]:
    return (e.message, e.inc, e.ninc, e.dec)


Key = tuple[str, int]
"""(participant, seq): one recorded event."""


def _match(parts: Mapping[str, Sequence[TraceEvent]]) -> dict[Key, Key]:
    """Receive -> send. Per directed link, each receive takes the earliest unmatched send
    with the same content: FIFO on one link, and a lost message does not shift the rest."""
    sends: dict[tuple[str, str], list[TraceEvent]] = defaultdict(list)
    for who, events in parts.items():
        for e in events:
            if e.event == "send":
                sends[(who, e.peer)].append(e)
    used: set[Key] = set()
    matched: dict[Key, Key] = {}
    for who, events in parts.items():
        for e in events:
            if e.event != "receive":
                continue
            for s in sends.get((e.peer, who), ()):
                key = (e.peer, s.seq)
                if key not in used and _signature(s) == _signature(e):
                    used.add(key)
                    matched[(who, e.seq)] = key
                    break
    return matched


def assemble(
    wave_id: str,
    algorithm: str,
    parts: Mapping[str, Sequence[TraceEvent]],
    lanes: Sequence[str],
    missing: Iterable[str] = (),
    wave_complete: bool = True,
    wave_missing: Iterable[str] = (),
    truncated: Iterable[str] = (),
) -> TraceJson:
    """The wave's trace (the JSON the API serves): one entry per message (send and
    receive, with each side's clock and vector clock) and per decision, in an order
    consistent with causality; `step` numbers every event in that order.

    `parts` holds each participant's events (by its own `seq`); `lanes` names every
    participant in display order (the balancer first); `missing` those whose part could
    not be had."""
    events = {who: sorted(evs, key=lambda e: e.seq) for who, evs in parts.items()}
    matched = _match(events)
    send_to_receive = {s: r for r, s in matched.items()}
    order = {name: i for i, name in enumerate(lanes)}
    for who in events:
        order.setdefault(who, len(order))

    # Linearise: a participant's next event is ready unless it is a receive whose send has
    # not been placed yet; among ready ones, the earliest by its own clock goes first.
    cursor = dict.fromkeys(events, 0)
    placed: dict[Key, tuple[int, dict[str, int]]] = {}
    clocks: dict[str, dict[str, int]] = {who: {} for who in events}
    waiting: dict[Key, str] = {}
    heap: list[tuple[float, int, str]] = []

    def offer(who: str) -> None:
        i = cursor[who]
        if i >= len(events[who]):
            return
        e = events[who][i]
        send = matched.get((who, e.seq))
        if send is not None and send not in placed:
            waiting[send] = who
            return
        heapq.heappush(heap, (e.at, order[who], who))

    for who in events:
        offer(who)
    step = 0
    inconsistent = 0
    total = sum(len(v) for v in events.values())
    while step < total:
        if not heap:
            # Only a wrong match can make a cycle; drop the first blocked match.
            inconsistent += 1
            blocked_on, who = next(iter(waiting.items()))
            del waiting[blocked_on]
            e = events[who][cursor[who]]
            del matched[(who, e.seq)]
            send_to_receive.pop(blocked_on, None)
            heapq.heappush(heap, (e.at, order[who], who))
            continue
        _, _, who = heapq.heappop(heap)
        e = events[who][cursor[who]]
        clock = clocks[who]
        source = matched.get((who, e.seq))
        if source is not None:
            for p, c in placed[source][1].items():
                if clock.get(p, 0) < c:
                    clock[p] = c
        clock[who] = clock.get(who, 0) + 1
        placed[(who, e.seq)] = (step, dict(clock))
        step += 1
        cursor[who] += 1
        offer(who)
        blocked = waiting.pop((who, e.seq), None)
        if blocked is not None:
            offer(blocked)

    entries = _entries(algorithm, events, matched, send_to_receive, placed)
    unmatched_receives = sum(
        1
        for who, evs in events.items()
        for e in evs
        if e.event == "receive" and (who, e.seq) not in matched
    )
    unreceived = sum(
        1
        for who, evs in events.items()
        for e in evs
        if e.event == "send" and (who, e.seq) not in send_to_receive
    )
    missing_list = sorted(set(missing), key=lambda n: order.get(n, len(order)))
    truncated_list = sorted(set(truncated))
    complete = (
        wave_complete
        and not missing_list
        and not truncated_list
        and not unmatched_receives
        and not unreceived
        and not inconsistent
    )
    return {
        "wave_id": wave_id,
        "algorithm": algorithm,
        "complete": complete,
        "wave_complete": wave_complete,
        "missing": missing_list,
        "wave_missing": sorted(set(wave_missing), key=lambda n: order.get(n, len(order))),
        "truncated": truncated_list,
        "unreceived": unreceived,
        "unmatched_receives": unmatched_receives,
        "lanes": [n for n in lanes],
        "messages": sum(1 for x in entries if x["kind"] != "decide"),
        "steps": total,
        "events": entries,
    }


def _entries(
    algorithm: str,
    events: Mapping[str, Sequence[TraceEvent]],
    matched: Mapping[Key, Key],
    send_to_receive: Mapping[Key, Key],
    placed: Mapping[Key, tuple[int, dict[str, int]]],
) -> list[TraceJson]:
    by_key = {(who, e.seq): e for who, evs in events.items() for e in evs}
    first_receive: set[Key] = set()
    if algorithm == "echo":
        for who, evs in events.items():
            first = next((e for e in evs if e.event == "receive"), None)
            if first is not None and first.message == "explore":
                first_receive.add((who, first.seq))
    out: list[TraceJson] = []
    for key, e in by_key.items():
        who = key[0]
        step, clock = placed[key]
        if e.event == "decide":
            entry: TraceJson = {
                "kind": "decide",
                "from": who,
                "to": None,
                "sent": e.at,
                "received": None,
                "clock": clock,
                "step": step,
            }
            if e.inc is not None:
                entry["inc"], entry["ninc"] = e.inc, e.ninc
            out.append(entry)
            continue
        if e.event == "receive" and key in matched:
            continue  # reported with its send
        send: TraceEvent | None = e if e.event == "send" else None
        receive: TraceEvent | None = e if e.event == "receive" else None
        send_key: Key | None = key if send is not None else None
        recv_key: Key | None = key if receive is not None else None
        if send is not None and key in send_to_receive:
            recv_key = send_to_receive[key]
            receive = by_key[recv_key]
        sender = who if send is not None else e.peer
        receiver = e.peer if send is not None else who
        last = recv_key if recv_key is not None else key
        entry = {
            "kind": e.message,
            "from": sender,
            "to": receiver,
            "sent": send.at if send is not None else None,
            "received": receive.at if receive is not None else None,
            "clock": placed[last][1],
            "send_clock": placed[send_key][1] if send_key is not None else None,
            "step": placed[last][0],
            "send_step": placed[send_key][0] if send_key is not None else None,
        }
        if algorithm == "echo":
            entry["tree"] = e.message == "reply" or (
                recv_key is not None and recv_key in first_receive
            )
        if e.inc is not None:
            entry["inc"], entry["ninc"], entry["dec"] = e.inc, e.ninc, e.dec
            if receive is not None and receive.known_inc is not None:
                entry["known_inc"] = receive.known_inc
                entry["known_ninc"] = receive.known_ninc
        out.append(entry)
    out.sort(key=lambda x: x["step"])
    return out


# --- ShiViz ------------------------------------------------------------------------------------


def _describe(kind: str, who: str, peer: str | None, entry: TraceJson) -> str:
    sets = ""
    if "inc" in entry and entry["kind"] != "decide":
        sets = f" |inc|={entry['inc']} |ninc|={entry['ninc']} |dec|={entry['dec']}"
    if kind == "send":
        return f"{who} sends {entry['kind']} to {peer}{sets}"
    if kind == "receive":
        return f"{who} receives {entry['kind']} from {peer}{sets}"
    if "inc" in entry:
        return f"{who} decides |inc|={entry['inc']} |ninc|={entry['ninc']}"
    return f"{who} decides"


def shiviz_log(trace: Mapping[str, Any]) -> str:
    """The trace as a ShiViz log (its default parser): every send, receive and decision
    on two lines, `description` then `host {"host": n, ...}` with the vector clock."""
    rows: list[tuple[int, str, str, dict[str, int]]] = []
    for entry in trace["events"]:
        if entry["kind"] == "decide":
            who = entry["from"]
            rows.append((entry["step"], who, _describe("decide", who, None, entry), entry["clock"]))
            continue
        if entry["send_step"] is not None:
            who = entry["from"]
            rows.append(
                (
                    entry["send_step"],
                    who,
                    _describe("send", who, entry["to"], entry),
                    entry["send_clock"],
                )
            )
        if entry["received"] is not None:
            who = entry["to"]
            rows.append(
                (
                    entry["step"],
                    who,
                    _describe("receive", who, entry["from"], entry),
                    entry["clock"],
                )
            )
    rows.sort(key=lambda r: r[0])
    lines = []
    for _, host, text, clock in rows:
        lines.append(f"{text} [{trace['wave_id']}]")
        lines.append(f"{host} {json.dumps(clock, separators=(',', ':'))}")
    return "\n".join(lines) + "\n"


def shiviz_file(traces: Iterable[Mapping[str, Any]]) -> str:
    """Traces as one file for ShiViz's upload: the parser regex on the first line, the
    execution delimiter on the second (ShiViz reads both from there, as typed, also when it
    anchors them with ^...$), then every wave as an execution under its delimiter line."""
    parts = [SHIVIZ_DEFAULT_PARSER + "\n", SHIVIZ_DELIMITER + "\n"]
    for trace in traces:
        parts.append(f"=== wave {trace['wave_id']} ===\n")
        parts.append(shiviz_log(trace))
    return "".join(parts)
