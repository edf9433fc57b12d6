"""Traces in the core: recording is bounded, tracing leaves the wave's messages exactly as
they are, and `assemble` matches receives to sends and orders everything causally, also
with lost messages and missing parts. Plus the balancer's choice of which waves to trace,
and the `trace` / `simulate --trace` commands."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from treewave.balancer.traces import WaveTraces, sampled_waves, unsettled
from treewave.cli.main import main
from treewave.core.events import EchoResult
from treewave.core.messages import (
    EchoExplore,
    EchoReply,
    FinnSets,
    FinnWork,
    TraceEvent,
    encode,
)
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.simulation import SimNetwork
from treewave.core.topology import BALANCER, Topology
from treewave.core.trace import TraceRecorder, assemble, shiviz_log
from treewave.wire.links import LinkSet


def happened_before(a: dict[str, int], b: dict[str, int]) -> bool:
    return all(b.get(k, 0) >= v for k, v in a.items()) and a != b


def check_causal(trace: dict[str, Any]) -> None:
    for e in trace["events"]:
        if e["kind"] != "decide" and e["received"] is not None and e["send_clock"] is not None:
            assert happened_before(e["send_clock"], e["clock"]), e
    steps = [e["step"] for e in trace["events"]]
    assert steps == sorted(steps)


@pytest.mark.parametrize("seed", range(6))
def test_simulated_traces_are_whole_and_causal(seed: int) -> None:
    topo = random_topology(40, seed, TreeShape(3, 4))
    net = SimNetwork(topo, trace=True)
    rng = random.Random(seed)
    net.start_echo("e")
    net.run(rng)
    net.start_finn("f", FinnWork())
    net.run(rng)
    echo, finn = net.trace("e"), net.trace("f")
    assert echo["complete"]
    assert finn["complete"]
    assert echo["messages"] == 2 * topo.echo_edge_count == net.logs["e"].messages
    assert finn["messages"] == net.logs["f"].messages
    check_causal(echo)
    check_causal(finn)
    # The marked tree edges are the spanning tree the wave reported.
    result = net.logs["e"].result
    assert isinstance(result, EchoResult)
    parents = {s.name: s.echo_parent for s in result.states}
    marked = {(m["from"], m["to"]) for m in echo["events"] if m.get("tree")}
    assert marked == {(p, n) for n, p in parents.items()} | {(n, p) for n, p in parents.items()}
    decisions = [e["from"] for e in finn["events"] if e["kind"] == "decide"]
    assert Counter(decisions) == Counter([*topo.names, BALANCER])
    assert decisions[-1] == BALANCER


def test_tracing_does_not_change_the_wave() -> None:
    """Same seed with and without tracing: byte for byte the same messages."""
    topo = random_topology(30, 5, TreeShape(3, 3))

    def wire(trace: bool) -> list[str]:
        net = SimNetwork(topo, trace=trace)
        rng = random.Random(9)
        sent: list[str] = []
        post = net._post

        def spy(sender: str, sends: Any) -> None:
            sent.extend(encode(s.message) for s in sends)
            post(sender, sends)

        net._post = spy  # type: ignore[method-assign]
        net.start_echo("e")
        net.run(rng)
        net.start_finn("f", FinnWork())
        net.run(rng)
        return sent

    assert wire(True) == wire(False)


def test_recorder_is_bounded() -> None:
    explore = EchoExplore(wave="w0", sender="a", budget_s=1)
    rec = TraceRecorder("b", max_waves=2, events_per_wave=3)
    for w in ("w0", "w1", "w2"):
        rec.received("a", explore.model_copy(update={"wave": w}), 1.0)
    assert list(rec.waves) == ["w1", "w2"]
    assert rec.part("w0").events == ()
    for _ in range(5):
        rec.sent("c", explore.model_copy(update={"wave": "w2"}), 2.0)
    part = rec.part("w2")
    assert len(part.events) == 3
    assert part.truncated
    off = TraceRecorder("b", max_waves=0)
    off.received("a", explore, 1.0)
    assert off.waves == {}
    with pytest.raises(ValueError, match="max_waves"):
        TraceRecorder("b", max_waves=-1)


def ev(seq: int, event: str, peer: str = "", message: str = "finn", **sets: int) -> TraceEvent:
    return TraceEvent.model_validate(
        {"seq": seq, "event": event, "peer": peer, "message": message, "at": float(seq), **sets}
    )


def test_fifo_matching_and_a_lost_message() -> None:
    """Two identical messages a->b: the first receive matches the first send. A third is
    lost: it shows as sent, never received, and the trace is partial."""
    parts = {
        "a": [
            ev(0, "send", "b", inc=1, ninc=0, dec=0),
            ev(1, "send", "b", inc=1, ninc=0, dec=0),
            ev(2, "send", "b", inc=2, ninc=1, dec=0),
        ],
        "b": [
            ev(0, "receive", "a", inc=1, ninc=0, dec=0),
            ev(1, "receive", "a", inc=1, ninc=0, dec=0),
            ev(2, "decide", message=""),
        ],
    }
    trace = assemble("w", "finn", parts, lanes=["a", "b"])
    msgs = [e for e in trace["events"] if e["kind"] == "finn"]
    got = [(m["send_step"], m["step"], m["sent"], m["received"]) for m in msgs]
    assert got == [(0, 1, 0.0, 0.0), (2, 3, 1.0, 1.0), (4, 4, 2.0, None)]
    assert trace["unreceived"] == 1
    assert trace["complete"] is False
    check_causal(trace)


def test_a_missing_part_leaves_receives_unmatched_and_named() -> None:
    parts = {
        BALANCER: [ev(0, "send", "a", "explore"), ev(1, "decide", message="")],
        "b": [ev(0, "receive", "a", "explore"), ev(1, "send", "a", "reply")],
    }
    trace = assemble(
        "w", "echo", parts, lanes=[BALANCER, "a", "b"], missing=["a"], wave_complete=False
    )
    assert trace["missing"] == ["a"]
    assert trace["complete"] is False
    assert trace["unmatched_receives"] == 1
    assert trace["unreceived"] == 2  # the balancer's explore and b's reply: a's side unknown
    orphan = next(e for e in trace["events"] if e["to"] == "b")
    assert orphan["sent"] is None
    assert orphan["send_clock"] is None
    log = shiviz_log(trace)
    assert "b receives explore from a" in log


def test_clock_disagreement_does_not_reorder_causality() -> None:
    """b's clock is an hour behind: its receive still comes after a's send."""
    parts = {
        "a": [TraceEvent(seq=0, event="send", message="explore", peer="b", at=5000.0)],
        "b": [TraceEvent(seq=0, event="receive", message="explore", peer="a", at=1400.0)],
    }
    trace = assemble("w", "echo", parts, lanes=["a", "b"])
    (m,) = trace["events"]
    assert m["send_step"] == 0
    assert m["step"] == 1
    assert m["clock"] == {"a": 1, "b": 1}


# --- which waves the balancer traces ---------------------------------------------------------


class Settings:
    trace_history = 2
    trace_sample = 0.0
    step_timeout_s = 0.1


class Record:
    def __init__(self, wave: str, trigger: str) -> None:
        self.wave_id = wave
        self.algorithm = "echo"
        self.complete = True
        self.missing: list[str] = []
        self.messages = 2
        self.duration_s = 0.01
        self.finished_at = 0.0
        self.trigger = trigger


async def test_balancer_traces_api_waves_not_refreshes_and_samples_periodic() -> None:
    topo = random_topology(3, 1, TreeShape(2, 0))
    events: list[dict[str, Any]] = []
    traces = WaveTraces(Settings(), topo, LinkSet(), events.append, random.Random(1))
    traces.finished(Record("status-1", "status"))
    with sampled_waves():
        traces.finished(Record("periodic-1", "rebalance"))
    traces.finished(Record("api-1", "api"))
    traces.finished(Record("rebalance-1", "rebalance"))  # POST /api/rebalance
    traces.finished(Record("api-2", "api"))
    assert traces.skipped == 2
    assert list(traces.history) == ["rebalance-1", "api-2"]  # bounded to 2
    trace = await traces.get("api-2", 5.0)
    assert trace is not None
    assert trace["missing"] == list(topo.names)  # no server linked: none could answer
    assert trace["complete"] is False
    assert await traces.get("status-1", 0.1) is None
    await traces.close()
    assert [e["wave_id"] for e in events][-1] == "api-2"


async def test_a_trace_is_assembled_when_first_read() -> None:
    """Gathering keeps the parts; the trace is put together only when something reads it
    (the listing or the trace itself), once, and the same trace either way."""
    topo = random_topology(3, 1, TreeShape(2, 0))
    events: list[dict[str, Any]] = []
    traces = WaveTraces(Settings(), topo, LinkSet(), events.append, random.Random(1))
    traces.finished(Record("api-1", "api"))
    stored = traces.history["api-1"]
    await asyncio.wait_for(stored.ready.wait(), 5.0)
    assert stored.gathered is not None
    assert stored.trace is None  # gathered, not assembled
    assert "complete" not in stored.summary
    assert events[-1] == {"event": "trace", "wave_id": "api-1", "algorithm": "echo"}
    (listed,) = traces.listing()
    assert listed["ready"] is True
    assert listed["complete"] is False  # no server linked: none could answer
    assert listed["missing"] == list(topo.names)
    assert stored.gathered is None  # the parts are dropped once assembled
    trace = await traces.get("api-1", 1.0)
    assert trace is stored.trace
    assert trace is not None
    assert trace["missing"] == list(topo.names)
    assert traces.assembled() == [trace]
    await traces.close()


# --- commands -----------------------------------------------------------------------------


def test_simulate_trace_file_and_trace_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "waves.json"
    assert main(["simulate", "--nodes", "12", "--seed", "4", "--trace", str(out)]) == 0
    capsys.readouterr()
    waves = json.loads(out.read_text())["waves"]
    assert [w["wave_id"] for w in waves] == ["echo-1", "finn-1"]
    assert set(waves[0]) >= {"wave_id", "algorithm", "complete", "events", "lanes"}
    assert set(waves[0]["events"][0]) >= {"kind", "from", "to", "sent", "received", "clock"}
    assert main(["trace", "echo-1", "--file", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("echo wave echo-1 · trace complete")
    assert len(text.splitlines()) == 2 + waves[0]["messages"] + 1  # head, columns, decide
    assert main(["trace", "latest", "--file", str(out), "--shiviz"]) == 0
    log = capsys.readouterr().out
    assert log.splitlines()[-2] == "balancer decides |inc|=13 |ninc|=13 [finn-1]"
    assert main(["trace", "nope", "--file", str(out)]) == 1
    assert "unknown wave 'nope'" in capsys.readouterr().err
    assert main(["simulate", "--nodes", "2001", "--trace", str(out)]) == 1
    assert "at most 2000 servers" in capsys.readouterr().err


def test_finn_sets_are_recorded_with_sizes() -> None:
    rec = TraceRecorder("x")
    msg = FinnSets(
        wave="f",
        sender="b",
        inc=frozenset({"b", "balancer"}),
        ninc=frozenset({"b"}),
        dec={"b": 1},
        work=FinnWork(),
        budget_s=1,
    )
    rec.received("b", msg, 1.0, known=(3, 2))
    (e,) = rec.part("f").events
    assert (e.inc, e.ninc, e.dec, e.known_inc, e.known_ninc) == (2, 1, 1, 3, 2)


async def test_history_zero_turns_tracing_off() -> None:
    class Off(Settings):
        trace_history = 0

    topo = random_topology(3, 1, TreeShape(2, 0))
    traces = WaveTraces(Off(), topo, LinkSet(), lambda _: None)
    explore = EchoExplore(wave="api-1", sender=BALANCER, budget_s=1)
    traces.received("s0", explore)
    traces.finished(Record("api-1", "api"))
    assert not traces.enabled
    assert traces.recorder.waves == {}
    assert traces.history == {}
    assert await traces.get("api-1", 0.1) is None


# --- parts pushed by the servers ---------------------------------------------------------------


def test_a_part_is_due_when_done_and_again_after_a_later_event() -> None:
    reply = EchoReply(wave="w", sender="b", states=(), sent=1)
    rec = TraceRecorder("b")
    rec.received("a", EchoExplore(wave="w", sender="a", budget_s=1), 1.0)
    assert rec.take_due() == []  # not done: nothing pushed
    rec.sent("a", reply, 2.0)
    rec.done("w")
    [part] = rec.take_due()
    assert (part.wave, part.server, part.pushed, len(part.events)) == ("w", "b", True, 2)
    assert rec.take_due() == []  # pushed once
    rec.received("c", EchoExplore(wave="w", sender="c", budget_s=1), 3.0)
    [again] = rec.take_due()
    assert [e.seq for e in again.events] == [0, 1, 2]  # the whole part, not the new event
    assert rec.part("w").pushed is False  # the answer to a request


def simulated_wave(topo: Topology, algorithm: str) -> SimNetwork:
    net = SimNetwork(topo, trace=True)
    if algorithm == "echo":
        net.start_echo("w")
    else:
        net.start_finn("w", FinnWork())
    net.run(random.Random(3))
    return net


@pytest.mark.parametrize("algorithm", ["echo", "finn"])
async def test_pushed_parts_make_the_trace_without_a_request(algorithm: str) -> None:
    """Every server's part pushed: the trace is whole and exact, and nobody was asked (no
    server is linked here: one asked would be named missing)."""
    topo = random_topology(20, 4, TreeShape(3, 2))
    net = simulated_wave(topo, algorithm)
    traces = WaveTraces(Settings(), topo, LinkSet(), lambda _: None)
    for e in net.recorders[BALANCER].events("w"):
        if e.event != "decide":  # the balancer's decision is recorded by `finished`
            traces.recorder.record("w", e)
    early = topo.names[: len(topo.names) // 2]
    for name in early:  # some parts come before the balancer decides, the rest after
        traces.on_part(name, net.recorders[name].part("w", pushed=True))
    record = Record("w", "api")
    record.algorithm = algorithm
    traces.finished(record)
    for name in topo.names[len(early) :]:
        traces.on_part(name, net.recorders[name].part("w", pushed=True))
    trace = await traces.get("w", 5.0)
    assert trace is not None
    assert trace["missing"] == []
    assert trace["complete"] is True
    assert trace["messages"] == net.logs["w"].messages == net.trace("w")["messages"]

    def events(trace: dict[str, Any]) -> Counter[tuple[Any, ...]]:
        """Every message and decision, with its sets and whether it was received (the
        balancer's own decision is recorded at another moment here: steps differ)."""
        keys = ("kind", "from", "to", "inc", "ninc", "dec", "known_inc", "known_ninc")
        return Counter(
            (*(e.get(k) for k in keys), e.get("received") is not None)
            for e in trace["events"]
            if e["kind"] != "decide" or e["from"] != BALANCER
        )

    assert events(trace) == events(net.trace("w"))
    assert traces.pushed == {}
    await traces.close()


async def test_a_stale_or_missing_pushed_part_is_asked_for_then_named() -> None:
    topo = random_topology(8, 2, TreeShape(2, 0))
    net = simulated_wave(topo, "echo")
    parts = {n: net.recorders[n].part("w", pushed=True) for n in topo.names}
    own = net.recorders[BALANCER].events("w")
    assert unsettled(topo.names, own, parts) == set()
    leaf = next(n for n in topo.names if not topo.children(n))
    parent = next(n for n in topo.names if leaf in topo.children(n))
    cut = parts[leaf].model_copy(update={"rows": parts[leaf].rows[:-1]})  # no reply sent
    assert unsettled(topo.names, own, {**parts, leaf: cut}) == {leaf}
    assert unsettled(topo.names, own, {n: p for n, p in parts.items() if n != parent}) == {parent}
    traces = WaveTraces(Settings(), topo, LinkSet(), lambda _: None)
    for e in own[:-1]:  # not its decision: `finished` records that
        traces.recorder.record("w", e)
    for name, part in parts.items():
        if name != parent:
            traces.on_part(name, part)
    traces.finished(Record("w", "api"))
    trace = await traces.get("w", 5.0)  # half the step timeout, then asked: no link
    assert trace is not None
    assert trace["missing"] == [parent]
    assert trace["complete"] is False
    await traces.close()
