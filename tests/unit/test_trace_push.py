"""Trace parts pushed in batches: the waves a server finished within one push window share
a frame, a part asked for is not pushed again, and a trace wanted before the parts come
is asked for at once instead of after the wait for pushes."""

from __future__ import annotations

import random

import pytest

from treewave.balancer.traces import WaveTraces
from treewave.core import trace as trace_module
from treewave.core.messages import (
    EchoExplore,
    EchoReply,
    TracePart,
    TraceParts,
    encode,
    parse_message,
)
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER
from treewave.core.trace import TraceRecorder
from treewave.wire.links import LinkSet


def finished(rec: TraceRecorder, wave: str, at: float) -> None:
    """`rec`'s server took part in `wave` (explore in, reply out) and is done with it."""
    rec.received("a", EchoExplore(wave=wave, sender="a", budget_s=1), at)
    rec.sent("a", EchoReply(wave=wave, sender=rec.name, states=(), sent=1), at + 0.5)
    rec.done(wave)


def test_the_waves_finished_in_one_window_share_one_frame() -> None:
    rec = TraceRecorder("b")
    for i in range(3):
        finished(rec, f"w{i}", float(i))
    [frame] = rec.push_frames()
    assert isinstance(frame, TraceParts)
    assert sorted(p.wave for p in frame.parts) == ["w0", "w1", "w2"]
    assert all(p.pushed and p.server == "b" and len(p.events) == 2 for p in frame.parts)
    assert parse_message(encode(frame)) == frame  # what the balancer reads is what was sent
    assert rec.push_frames() == []  # each pushed once


def test_a_lone_part_is_pushed_as_itself() -> None:
    rec = TraceRecorder("b")
    finished(rec, "w", 1.0)
    [frame] = rec.push_frames()
    assert isinstance(frame, TracePart)
    assert (frame.wave, frame.pushed, len(frame.events)) == ("w", True, 2)


def test_a_batch_is_split_into_frames_past_the_event_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trace_module, "EVENTS_PER_FRAME", 5)
    rec = TraceRecorder("b")
    for i in range(5):
        finished(rec, f"w{i}", float(i))  # 2 events each: 2 waves per frame
    frames = rec.push_frames()
    sizes = [len(f.parts) if isinstance(f, TraceParts) else 1 for f in frames]
    assert sizes == [2, 2, 1]
    waves = [p.wave for f in frames for p in (f.parts if isinstance(f, TraceParts) else (f,))]
    assert sorted(waves) == [f"w{i}" for i in range(5)]


def test_a_part_asked_for_is_not_pushed_again_until_more_is_recorded() -> None:
    rec = TraceRecorder("b")
    finished(rec, "w", 1.0)
    part = rec.answered("w")
    assert (part.pushed, len(part.events)) == (False, 2)
    assert rec.push_frames() == []  # the balancer has it
    rec.received("c", EchoExplore(wave="w", sender="c", budget_s=1), 3.0)
    [again] = rec.push_frames()
    assert isinstance(again, TracePart)
    assert [e.seq for e in again.events] == [0, 1, 2]


class SlowSettings:
    trace_history = 5
    trace_sample = 0.0
    step_timeout_s = 600.0
    """The wait for pushes alone (half of this) would outlast the test."""


class Record:
    wave_id = "w"
    algorithm = "echo"
    complete = True
    missing: list[str] = []
    messages = 2
    duration_s = 0.01
    finished_at = 0.0
    trigger = "api"


async def test_a_trace_wanted_before_its_parts_come_is_asked_for_at_once() -> None:
    """One server's part is still in its push window when the trace is read: the balancer
    asks for it at once (here no link: it is named missing) rather than waiting for it."""
    topo = random_topology(8, 2, TreeShape(2, 0))
    net = SimNetwork(topo, trace=True)
    net.start_echo("w")
    net.run(random.Random(3))
    own = net.recorders[BALANCER].events("w")
    late = topo.names[-1]
    traces = WaveTraces(SlowSettings(), topo, LinkSet(), lambda _: None)
    for e in own[:-1]:  # not its decision: `finished` records that
        traces.recorder.record("w", e)
    for name in topo.names:
        if name != late:
            traces.on_part(name, net.recorders[name].part("w", pushed=True))
    traces.finished(Record())
    trace = await traces.get("w", 30.0)
    assert trace is not None
    assert trace["missing"] == [late]
    assert traces.wanted == set()
    await traces.close()


async def test_parts_pushed_in_one_frame_make_the_traces_of_several_waves() -> None:
    """Two back-to-back waves, each server's parts of both in one frame: both traces are
    whole and exact without any request (no server is linked: one asked would be missing)."""
    topo = random_topology(12, 5, TreeShape(3, 2))
    net = SimNetwork(topo, trace=True)
    rng = random.Random(5)
    traces = WaveTraces(SlowSettings(), topo, LinkSet(), lambda _: None)
    for wave in ("w1", "w2"):
        net.start_echo(wave)
        net.run(rng)
        for e in net.recorders[BALANCER].events(wave)[:-1]:
            traces.recorder.record(wave, e)
        record = Record()
        record.wave_id = wave
        traces.finished(record)
    for name in topo.names:
        frame = TraceParts(parts=tuple(net.recorders[name].part(w, True) for w in ("w1", "w2")))
        for part in parse_message(encode(frame)).parts:  # type: ignore[union-attr]
            traces.on_part(name, part)
    for wave in ("w1", "w2"):
        trace = await traces.get(wave, 30.0)
        assert trace is not None
        assert (trace["complete"], trace["missing"]) == (True, [])
        assert trace["messages"] == 2 * topo.echo_edge_count == net.trace(wave)["messages"]
    await traces.close()
