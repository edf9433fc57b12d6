"""Wave traces at the balancer: its own part of every wave, gathering the servers' parts
after a traced wave, a bounded history, and the API (`/api/waves`, `/api/waves/{id}`).

Which waves are traced: every wave started from the API (and so from the page's buttons);
periodic rebalancing waves with probability `trace_sample`; the page's own refresh Echoes
never (they run every few seconds and would push everything else out of the history).
Every server pushes its part (`trace.part`, `pushed`) on its direct link to the balancer
once it is done with a wave (an Echo server replied to its parent, a Finn server decided)
and again if it records more of it later, batched with the other waves it finished within
its push window (`trace.parts`, one frame): the wave's messages are exactly what they are
without tracing, and no request round follows the wave. A traced wave's parts are
gathered once every server's part is in and every message sent is received in some part;
a server still short of that after `step_timeout_s` (at once for a partial wave, or when
the trace is read before then: `get`) is asked (`trace.request` -> `trace.part`), and one
that does not answer within the step timeout is named in the trace's `missing` and makes
it partial (docs/traces.md). The trace is assembled from the parts when it is first read.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from treewave.core.api import WAVE_TRACE, TraceList, TraceListing
from treewave.core.echo import EchoInitiator
from treewave.core.events import Send
from treewave.core.finn import FinnInitiator
from treewave.core.messages import (
    EchoExplore,
    EchoReply,
    FinnSets,
    TraceEvent,
    TracePart,
    TraceRequest,
    TraceRow,
    rows_to_events,
)
from treewave.core.topology import BALANCER, Topology
from treewave.core.trace import TraceJson, TraceRecorder, assemble, shiviz_file
from treewave.wire.http import json_error
from treewave.wire.links import LinkSet

__all__ = [
    "TRACES_KEY",
    "TraceSettings",
    "WaveTraces",
    "sampled_waves",
    "setup_traces",
    "unsettled",
]

log = logging.getLogger("treewave.traces")

OWN_WAVES = 256
"""Waves whose balancer-side events are kept until the wave ends (in flight at once)."""

_SAMPLED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "treewave_trace_sampled", default=False
)


@contextlib.contextmanager
def sampled_waves() -> Iterator[None]:
    """Waves started inside this block (in this task) are traced only with probability
    `trace_sample`: the periodic rebalancing loop runs its rounds in one."""
    token = _SAMPLED.set(True)
    try:
        yield
    finally:
        _SAMPLED.reset(token)


class TraceSettings(Protocol):
    @property
    def trace_history(self) -> int: ...

    @property
    def trace_sample(self) -> float: ...

    @property
    def step_timeout_s(self) -> float: ...


class FinishedWave(Protocol):
    """What the balancer knows of a wave when it has decided (its `WaveRecord`)."""

    @property
    def wave_id(self) -> str: ...

    @property
    def algorithm(self) -> str: ...

    @property
    def complete(self) -> bool: ...

    @property
    def missing(self) -> list[str]: ...

    @property
    def messages(self) -> int: ...

    @property
    def duration_s(self) -> float: ...

    @property
    def finished_at(self) -> float: ...

    @property
    def trigger(self) -> str: ...


@dataclass(frozen=True)
class GatheredParts:
    """A traced wave's parts, as gathered: what `assemble` needs, kept until the trace
    is first read."""

    own: tuple[TraceEvent, ...]
    """The balancer's own events."""
    rows: dict[str, tuple[TraceRow, ...]]
    """Each server's rows (the events are built when the trace is assembled)."""
    lanes: tuple[str, ...]
    missing: list[str]
    truncated: list[str]


@dataclass
class StoredTrace:
    summary: dict[str, Any]
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the gathering has ended (with the parts, or cancelled)."""
    gathered: GatheredParts | None = None
    trace: TraceJson | None = None

    def assembled(self) -> TraceJson | None:
        """The trace, put together the first time it is read (None until its parts are
        gathered): assembling costs as much as the rest of tracing a wave at the
        balancer, and most traces are never read."""
        g = self.gathered
        if self.trace is None and g is not None:
            summary = self.summary
            trace = assemble(
                summary["wave_id"],
                summary["algorithm"],
                {BALANCER: g.own, **{n: rows_to_events(r) for n, r in g.rows.items()}},
                lanes=g.lanes,
                missing=g.missing,
                wave_complete=summary["wave_complete"],
                wave_missing=summary["wave_missing"],
                truncated=g.truncated,
            )
            self.trace = {**trace, **{k: v for k, v in summary.items() if k not in trace}}
            summary["complete"] = trace["complete"]
            summary["missing"] = trace["missing"]
            summary["messages"] = trace["messages"]
            self.gathered = None
        return self.trace


class WaveTraces:
    """The balancer's trace bookkeeping; the balancer calls `started`, `received`,
    `finished` and `on_part` from where it drives waves."""

    def __init__(
        self,
        settings: TraceSettings,
        topology: Topology,
        links: LinkSet,
        publish: Callable[[dict[str, Any]], None],
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self.links = links
        self.publish = publish
        self.rng = rng or random.Random()
        self.enabled = settings.trace_history > 0
        self.recorder = TraceRecorder(BALANCER, OWN_WAVES if self.enabled else 0)
        self.initiators: dict[str, EchoInitiator | FinnInitiator] = {}
        self.history: OrderedDict[str, StoredTrace] = OrderedDict()
        self.parts: dict[tuple[str, str], asyncio.Future[TracePart]] = {}
        """Parts asked for, by (server, wave)."""
        self.pushed: OrderedDict[str, dict[str, TracePart]] = OrderedDict()
        """Parts pushed for waves not decided yet here, by wave and server (at most
        `OWN_WAVES` waves)."""
        self.gathering: dict[str, tuple[dict[str, TracePart], asyncio.Event, int]] = {}
        """Traced waves being gathered: their parts so far, an event set when a part comes
        and there may be all of them (and when the trace is wanted), how many servers."""
        self.wanted: set[str] = set()
        """Waves whose trace someone waits for (`get`): the servers still short are asked
        now rather than after their push window."""
        self.closed: OrderedDict[str, None] = OrderedDict()
        """Waves whose pushed parts are no longer wanted (not traced, or gathered)."""
        self.tasks: set[asyncio.Task[None]] = set()
        self.skipped = 0
        """Finished waves not traced (page refreshes, unsampled periodic waves)."""

    # --- hooks the balancer calls --------------------------------------------------------

    def started(self, init: EchoInitiator | FinnInitiator, sends: list[Send]) -> None:
        """A wave begins: record the initiator's first sends (before they go out)."""
        if not self.enabled:
            return
        self.initiators[init.wave] = init
        now = time.time()
        for send in sends:
            self.recorder.sent(send.to, send.message, now)

    def received(self, peer: str, msg: EchoExplore | EchoReply | FinnSets) -> None:
        """The initiator accepted a wave message."""
        if not self.enabled:
            return
        init = self.initiators.get(msg.wave)
        known = None
        if isinstance(init, FinnInitiator):
            known = (len(init.sets.inc), len(init.sets.ninc))
        self.recorder.received(peer, msg, time.time(), known)

    def finished(self, record: FinishedWave) -> None:
        """The wave decided: record the decision; if the wave is traced, gather it."""
        if not self.enabled:
            return
        init = self.initiators.pop(record.wave_id, None)
        sets = None
        if isinstance(init, FinnInitiator):
            sets = (len(init.sets.inc), len(init.sets.ninc))
        self.recorder.decided(record.wave_id, time.time(), sets)
        own = self.recorder.events(record.wave_id)
        self.recorder.waves.pop(record.wave_id, None)
        if not self._traced(record.trigger):
            self.skipped += 1
            self._close(record.wave_id)
            return
        stored = StoredTrace(
            summary={
                "wave_id": record.wave_id,
                "algorithm": record.algorithm,
                "trigger": record.trigger,
                "wave_complete": record.complete,
                "wave_missing": list(record.missing),
                "wave_messages": record.messages,
                "duration_s": round(record.duration_s, 6),
                "finished_at": record.finished_at,
            }
        )
        self.history[record.wave_id] = stored
        while len(self.history) > self.settings.trace_history:
            self.history.popitem(last=False)
        task = asyncio.create_task(self._gather(stored, own), name=f"trace-{record.wave_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_part(self, peer: str, part: TracePart) -> None:
        wave = part.wave
        if part.server != peer:
            log.debug("trace part for %s from %s claims to be %s's", wave, peer, part.server)
            return
        if not part.pushed:
            fut = self.parts.get((peer, wave))
            if fut is None or fut.done():
                log.debug("unexpected trace part for %s from %s", wave, peer)
                return
            fut.set_result(part)
            return
        if not self.enabled or wave in self.closed:
            return
        gathering = self.gathering.get(wave)
        if gathering is not None:
            got, pushed, servers = gathering
            got[peer] = part
            # The gatherer looks again only once every server may be in (a part pushed
            # again then too): not once per server, which costs a wake-up per frame.
            if len(got) >= servers:
                pushed.set()
            return
        parts = self.pushed.get(wave)
        if parts is None:
            parts = self.pushed[wave] = {}
            while len(self.pushed) > OWN_WAVES:
                self.pushed.popitem(last=False)
        parts[peer] = part

    # --- gathering -------------------------------------------------------------------------

    def _traced(self, trigger: str) -> bool:
        if trigger == "status":
            return False
        if _SAMPLED.get():
            return self.rng.random() < self.settings.trace_sample
        return True

    def _close(self, wave: str) -> None:
        self.pushed.pop(wave, None)
        self.closed[wave] = None
        while len(self.closed) > OWN_WAVES:
            self.closed.popitem(last=False)

    async def _ask(self, server: str, wave: str, timeout_s: float) -> TracePart | None:
        key = (server, wave)
        fut: asyncio.Future[TracePart] = asyncio.get_running_loop().create_future()
        self.parts[key] = fut
        try:
            if not await self.links.send(server, TraceRequest(wave=wave)):
                return None
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return None
        finally:
            self.parts.pop(key, None)

    async def _collect(
        self, wave: str, names: tuple[str, ...], own: tuple[TraceEvent, ...], complete: bool
    ) -> dict[str, TracePart]:
        """Every server's part: the pushed ones, waited for (the step timeout, not
        at all for a partial wave), then asked of the servers still short."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        step = self.settings.step_timeout_s
        parts = self.pushed.pop(wave, {})
        pushed = asyncio.Event()
        self.gathering[wave] = (parts, pushed, len(names))
        try:
            short = unsettled(names, own, parts, quick=True)
            while (
                short
                and complete
                and wave not in self.wanted
                and (left := start + step - loop.time()) > 0
            ):
                pushed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pushed.wait(), left)
                short = unsettled(names, own, parts, quick=True)
        finally:
            del self.gathering[wave]
        if short or not complete:
            short = unsettled(names, own, parts)
        if short:
            log.debug("trace of %s: asking %d servers for their parts", wave, len(short))
            timeout = max(start + step - loop.time(), step / 2)
            asked = sorted(short)
            got = await asyncio.gather(*(self._ask(n, wave, timeout) for n in asked))
            parts.update((n, p) for n, p in zip(asked, got, strict=True) if p is not None)
        return parts

    async def _gather(self, stored: StoredTrace, own: tuple[TraceEvent, ...]) -> None:
        summary = stored.summary
        wave = summary["wave_id"]
        try:
            names = self.topology.names
            got = await self._collect(wave, names, own, summary["wave_complete"])
            self._close(wave)
            parts: dict[str, tuple[TraceRow, ...]] = {}
            missing: list[str] = []
            truncated: list[str] = []
            for name in names:
                part = got.get(name)
                if part is None:
                    missing.append(name)
                    continue
                if part.truncated:
                    truncated.append(name)
                if part.rows:
                    parts[name] = part.rows
            stored.gathered = GatheredParts(own, parts, (BALANCER, *names), missing, truncated)
            if missing:
                log.warning("trace of %s is partial: no part from %s", wave, ", ".join(missing))
        finally:
            self.wanted.discard(wave)
            stored.ready.set()
        # Whether the trace is complete is known once it is assembled, when it is read.
        self.publish({"event": "trace", "wave_id": wave, "algorithm": summary["algorithm"]})

    async def get(self, wave: str, wait_s: float) -> TraceJson | None:
        """A traced wave's trace, waiting for its gathering if it is still under way;
        None if the wave is not (or no longer) in the history."""
        stored = self.history.get(wave)
        if stored is None:
            return None
        if not stored.ready.is_set():
            # Wanted now: the servers whose part has not come are asked at once.
            self.wanted.add(wave)
            gathering = self.gathering.get(wave)
            if gathering is not None:
                gathering[1].set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stored.ready.wait(), wait_s)
        return stored.assembled()

    def listing(self) -> list[dict[str, Any]]:
        """Every trace kept, newest first; those gathered are assembled to say whether
        they are complete."""
        out = []
        for stored in reversed(self.history.values()):
            ready = stored.assembled() is not None
            out.append({**stored.summary, "ready": ready})
        return out

    def assembled(self) -> list[TraceJson]:
        """Every gathered trace kept, oldest first."""
        traces = (s.assembled() for s in self.history.values())
        return [t for t in traces if t is not None]

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for fut in self.parts.values():
            if not fut.done():
                fut.cancel()


def unsettled(
    names: tuple[str, ...],
    own: tuple[TraceEvent, ...],
    parts: dict[str, TracePart],
    quick: bool = False,
) -> set[str]:
    """The servers whose part is not in or not final: no part yet, or a message between two
    participants that one part says was sent and the other's does not say was received
    (or the other way round). Empty when the parts make a whole wave. `quick`: only the
    servers without a part, if there are any (the messages are counted once all are in)."""
    short = {n for n in names if n not in parts}
    if short and quick:
        return short
    sent: Counter[tuple[str, str]] = Counter()
    got: Counter[tuple[str, str]] = Counter()
    # (participant, event, peer) of every event: the balancer's own, the servers' rows.
    seen = itertools.chain(
        ((BALANCER, e.event, e.peer) for e in own),
        ((who, row[0], row[2]) for who, part in parts.items() for row in part.rows),
    )
    for who, event, peer in seen:
        if event == "send":
            sent[who, peer] += 1
        elif event == "receive":
            got[peer, who] += 1
    if sent != got:
        short.update(b for _, b in (sent - got))
        short.update(a for a, _ in (got - sent))
        short.intersection_update(names)
    return short


# --- HTTP ------------------------------------------------------------------------------------

TRACES_KEY = web.AppKey("wave_traces", WaveTraces)


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "shiviz"):
        raise json_error(400, f"unknown format {fmt!r}: use format=json or format=shiviz")
    return fmt


def _shiviz(traces: Iterable[TraceJson]) -> web.Response:
    """A file ShiViz's upload opens as it is (`core.trace.shiviz_file`)."""
    return web.Response(text=shiviz_file(traces), content_type="text/plain")


async def api_waves(request: web.Request) -> web.Response:
    traces = request.app[TRACES_KEY]
    if _format(request) == "shiviz":
        # Every gathered trace kept, oldest first, one ShiViz execution each.
        return _shiviz(traces.assembled())
    listing = TraceList(
        enabled=traces.enabled,
        history=traces.settings.trace_history,
        sample=traces.settings.trace_sample,
        waves=[TraceListing.model_validate(w) for w in traces.listing()],
    )
    # Unset fields stay out: a trace not gathered yet has no `complete` (not a null one).
    return web.Response(
        text=listing.model_dump_json(exclude_unset=True), content_type="application/json"
    )


async def api_wave(request: web.Request) -> web.Response:
    traces = request.app[TRACES_KEY]
    wave = request.match_info["wave_id"]
    fmt = _format(request)
    wait_s = traces.settings.step_timeout_s + 2.0
    trace = await traces.get(wave, wait_s)
    if trace is None:
        if wave in traces.history:
            raise json_error(503, f"the trace of wave {wave!r} is still being gathered")
        kept = len(traces.history)
        raise json_error(
            404,
            f"unknown wave {wave!r}: it is not among the {kept} traced waves kept "
            f"(at most {traces.settings.trace_history}; see GET /api/waves)",
        )
    if fmt == "shiviz":
        return _shiviz([trace])
    return web.Response(
        text=WAVE_TRACE.validate_python(trace).model_dump_json(exclude_unset=True),
        content_type="application/json",
    )


def setup_traces(app: web.Application, traces: WaveTraces) -> None:
    """Add the trace API to the balancer's app; pending gatherings end with it."""
    app[TRACES_KEY] = traces
    app.router.add_get("/api/waves", api_waves, name="waves")
    app.router.add_get("/api/waves/{wave_id}", api_wave, name="wave_trace")

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await traces.close()

    app.cleanup_ctx.append(ctx)
