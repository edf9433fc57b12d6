"""Wave traces on a real local cluster: every server and the balancer are processes, the
trace is gathered from them over real WebSockets and read back through the HTTP API.

Checked: an Echo trace has exactly 2|E| message events, each link carries one message each
way, and every receive comes after its send in vector-clock order; in a Finn trace every
server decides exactly once and the balancer last; a wave with a dead server gives a
trace that says who is missing; the ShiViz export parses with ShiViz's own default parser
and its clocks pass the checks ShiViz makes when it builds its graph.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import Counter
from typing import Any

import aiohttp
import pytest

from tests.support.cluster import Cluster, StartCluster
from tests.support.shiviz import assert_shiviz_ready

SERVERS: list[dict[str, Any]] = [
    {"name": "aurora", "cpus": 4, "tasks": 2, "children": ["birch", "cedar", "delta"]},
    {"name": "birch", "cpus": 2, "tasks": 1, "children": ["ember", "fjord"]},
    {"name": "cedar", "cpus": 2, "tasks": 0, "children": ["fjord", "grove"]},
    {"name": "delta", "cpus": 1, "tasks": 3, "children": ["harbor"]},
    {"name": "ember", "cpus": 1, "tasks": 0, "children": []},
    {"name": "fjord", "cpus": 2, "tasks": 4, "children": ["iris"]},
    {"name": "grove", "cpus": 1, "tasks": 0, "children": []},
    {"name": "harbor", "cpus": 2, "tasks": 1, "children": ["juniper"]},
    {"name": "iris", "cpus": 1, "tasks": 0, "children": []},
    {"name": "juniper", "cpus": 1, "tasks": 2, "children": []},
]
DAG = {"settings": {"task_time_s": 3600.0, "wave_timeout_s": 10}, "servers": SERVERS}
TREE = {
    "settings": {"task_time_s": 3600.0, "wave_timeout_s": 3},
    "servers": [
        {"name": "oak", "cpus": 2, "tasks": 0, "children": ["pine", "yew"]},
        {"name": "pine", "cpus": 1, "tasks": 0, "children": ["ash", "elm"]},
        {"name": "yew", "cpus": 1, "tasks": 0, "children": []},
        {"name": "ash", "cpus": 1, "tasks": 0, "children": []},
        {"name": "elm", "cpus": 2, "tasks": 0, "children": []},
    ],
}

SHIVIZ_DEFAULT_PARSER = "(?<event>.*)\\n(?<host>\\S*) (?<clock>{.*})"
"""Verbatim from ShiViz (github.com/DistributedClocks/shiviz, js/shiviz.js, `defaultParser`).
ShiViz compiles it with the "m" flag (js/shiviz.js: `new NamedRegExp(regexpString, "m")`)."""


@pytest.fixture(scope="module")
def dag(start_module_cluster: StartCluster) -> Cluster:
    return start_module_cluster(DAG)


async def get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def trace_of(http: aiohttp.ClientSession, cluster: Cluster, wave: str) -> Any:
    return await get(http, f"{cluster.balancer_url}/api/waves/{wave}")


def messages(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["events"] if e["kind"] != "decide"]


def happened_before(a: dict[str, int], b: dict[str, int]) -> bool:
    """a -> b in vector-clock order: a <= b everywhere and a != b."""
    return all(b.get(k, 0) >= v for k, v in a.items()) and a != b


def assert_clocks_consistent(trace: dict[str, Any]) -> None:
    """Every receive after its send; every participant's own events numbered 1, 2, 3...
    in the trace's order, each later one after the earlier (a valid vector clock)."""
    for m in messages(trace):
        assert m["send_clock"] is not None, m
        assert m["received"] is not None, m
        assert happened_before(m["send_clock"], m["clock"]), m
        assert m["send_step"] < m["step"], m
    own: dict[str, list[dict[str, int]]] = {}
    points = []
    for e in trace["events"]:
        if e["kind"] == "decide":
            points.append((e["step"], e["from"], e["clock"]))
        else:
            points.append((e["send_step"], e["from"], e["send_clock"]))
            points.append((e["step"], e["to"], e["clock"]))
    points.sort(key=lambda p: p[0])
    assert [p[0] for p in points] == list(range(len(points)))  # one event per step
    for _, who, clock in points:
        own.setdefault(who, []).append(clock)
    for who, clocks in own.items():
        assert [c[who] for c in clocks] == list(range(1, len(clocks) + 1)), who
        for earlier, later in itertools.pairwise(clocks):
            assert happened_before(earlier, later), who


def undirected_links(cluster: Cluster) -> set[frozenset[str]]:
    return {frozenset(e) for e in cluster.edges} | {frozenset(("balancer", cluster.root))}


# --- Echo ---------------------------------------------------------------------------------


async def test_echo_trace_has_every_message_once_each_way_in_causal_order(
    dag: Cluster, http: aiohttp.ClientSession
) -> None:
    tree = await get(http, dag.balancer_url + "/api/tree")
    assert tree["complete"] is True
    trace = await trace_of(http, dag, tree["wave_id"])

    links = undirected_links(dag)
    assert trace["wave_id"] == tree["wave_id"]
    assert trace["algorithm"] == "echo"
    assert trace["complete"] is True
    assert trace["missing"] == []
    assert trace["lanes"] == ["balancer", *dag.names]
    msgs = messages(trace)
    assert len(msgs) == 2 * len(links) == tree["messages"]
    directed = Counter((m["from"], m["to"]) for m in msgs)
    assert set(directed.values()) == {1}
    assert {frozenset(d) for d in directed} == links
    for a, b in (tuple(link) for link in links):
        assert (a, b) in directed
        assert (b, a) in directed
    assert {m["kind"] for m in msgs} == {"explore", "reply"}
    # Each side's own clock is there; the balancer decides once, last.
    assert all(isinstance(m["sent"], float) and isinstance(m["received"], float) for m in msgs)
    decisions = [e for e in trace["events"] if e["kind"] == "decide"]
    assert [d["from"] for d in decisions] == ["balancer"]
    assert trace["events"][-1] == decisions[0]
    assert_clocks_consistent(trace)
    # The spanning tree: the edges marked `tree` are exactly the echo_parent edges.
    parents = {n["name"]: n["echo_parent"] for n in tree["nodes"]}
    tree_edges = {(m["from"], m["to"]) for m in msgs if m["tree"] and m["kind"] == "explore"}
    assert tree_edges == {(p, n) for n, p in parents.items()}
    replies = {(m["from"], m["to"]) for m in msgs if m["kind"] == "reply"}
    assert replies == {(n, p) for n, p in parents.items()}


async def test_wave_list_and_errors(dag: Cluster, http: aiohttp.ClientSession) -> None:
    tree = await get(http, dag.balancer_url + "/api/tree")
    listing = await get(http, dag.balancer_url + "/api/waves")
    assert listing["enabled"] is True
    first = listing["waves"][0]
    assert first["wave_id"] == tree["wave_id"]
    assert first["algorithm"] == "echo"
    assert first["trigger"] == "api"
    async with http.get(dag.balancer_url + "/api/waves/echo-nope-1") as resp:
        assert resp.status == 404
        body = await resp.json()
        assert "unknown wave 'echo-nope-1'" in body["error"]
    async with http.get(f"{dag.balancer_url}/api/waves/{tree['wave_id']}?format=xml") as resp:
        assert resp.status == 400
        assert "unknown format 'xml'" in (await resp.json())["error"]


# --- Finn ---------------------------------------------------------------------------------


async def test_finn_trace_every_server_decides_once_balancer_last(
    dag: Cluster, http: aiohttp.ClientSession
) -> None:
    async with http.post(dag.balancer_url + "/api/finn", json={"tasks_per_node": 1}) as resp:
        assert resp.status == 200
        finn = await resp.json()
    assert finn["complete"] is True
    trace = await trace_of(http, dag, finn["wave_id"])
    assert trace["complete"] is True
    assert trace["algorithm"] == "finn"
    decisions = [e for e in trace["events"] if e["kind"] == "decide"]
    assert Counter(d["from"] for d in decisions) == Counter([*dag.names, "balancer"])
    assert decisions[-1]["from"] == "balancer"
    assert trace["events"][-1] == decisions[-1]
    last = decisions[-1]["clock"]
    for d in decisions[:-1]:
        assert happened_before(d["clock"], last), d  # the balancer heard of every decision
    msgs = messages(trace)
    assert len(msgs) == finn["messages"]  # the wave's own count
    assert all(m["kind"] == "finn" and m["inc"] >= 1 for m in msgs)
    # Finn's rule: a server decides when inc == ninc; the balancer's sets hold everyone.
    for d in decisions:
        assert d["inc"] == d["ninc"], d
    assert decisions[-1]["inc"] == len(dag.names) + 1
    assert_clocks_consistent(trace)


# --- ShiViz -------------------------------------------------------------------------------


def shiviz_parse(text: str) -> list[tuple[str, str, dict[str, int]]]:
    """ShiViz's default parser as ShiViz runs it (named groups in Python syntax)."""
    import json

    regex = re.compile(SHIVIZ_DEFAULT_PARSER.replace("(?<", "(?P<"), re.MULTILINE)
    events = []
    for m in regex.finditer(text):
        clock = json.loads(m.group("clock"))
        events.append((m.group("event"), m.group("host"), clock))
    return events


def shiviz_graph_checks(events: list[tuple[str, str, dict[str, int]]]) -> None:
    """The checks ShiViz makes (js/model/vectorTimestamp.js, js/model/modelGraph.js): the
    host is in its own clock; a host's own times are exactly 1..n; every host named in a
    clock has events, and the time named is one of its events."""
    by_host: dict[str, list[int]] = {}
    for _, host, clock in events:
        assert host in clock, f"local host {host} missing from its timestamp"
        assert all(isinstance(v, int) and v >= 0 for v in clock.values())
        by_host.setdefault(host, []).append(clock[host])
    for host, times in by_host.items():
        assert sorted(times) == list(range(1, len(times) + 1)), host
    for _, _, clock in events:
        for other, t in clock.items():
            assert other in by_host, f"unknown host {other}"
            assert 1 <= t <= len(by_host[other]) or t == 0


async def test_shiviz_export_parses_with_shivizs_default_parser(
    dag: Cluster, http: aiohttp.ClientSession
) -> None:
    for path, method, body in (("/api/tree", "GET", None), ("/api/finn", "POST", {})):
        async with http.request(method, dag.balancer_url + path, json=body) as resp:
            assert resp.status == 200
            wave = (await resp.json())["wave_id"]
        trace = await trace_of(http, dag, wave)
        url = f"{dag.balancer_url}/api/waves/{wave}?format=shiviz"
        async with http.get(url) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            text = await resp.text()
        events = shiviz_parse(text)
        # Every send, receive and decision, each exactly once, with the trace's clocks.
        assert (
            len(events)
            == trace["steps"]
            == 2 * len(messages(trace)) + sum(1 for e in trace["events"] if e["kind"] == "decide")
        )
        # The parser and delimiter lines, the wave's delimiter line, two lines per event.
        assert len(text.splitlines()) == 3 + 2 * len(events)
        shiviz_graph_checks(events)
        hosts = {h for _, h, _ in events}
        assert hosts == {"balancer", *dag.names}
        assert all(wave in line for line, _, _ in events)
        # As ShiViz's file upload reads it (node): one execution, every event.
        (execution,) = assert_shiviz_ready(text, [trace])
        assert [(h, c) for _, h, c in execution.events] == [(h, c) for _, h, c in events]


async def test_every_kept_trace_in_one_shiviz_file(
    dag: Cluster, http: aiohttp.ClientSession
) -> None:
    for path, method, body in (("/api/tree", "GET", None), ("/api/finn", "POST", {})):
        async with http.request(method, dag.balancer_url + path, json=body) as resp:
            assert resp.status == 200
    waves = [await trace_of(http, dag, w["wave_id"]) for w in await ready_waves(http, dag)]
    assert len(waves) >= 2
    async with http.get(f"{dag.balancer_url}/api/waves?format=shiviz") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    executions = assert_shiviz_ready(text, waves[::-1])  # oldest first
    assert {x.label.split("-")[0] for x in executions} == {"echo", "finn"}
    async with http.get(f"{dag.balancer_url}/api/waves?format=svg") as resp:
        assert resp.status == 400
        assert "unknown format" in (await resp.json())["error"]


async def ready_waves(http: aiohttp.ClientSession, cluster: Cluster) -> list[Any]:
    """The listing's waves once every one is gathered (newest first)."""
    for _ in range(100):
        listing = await get(http, cluster.balancer_url + "/api/waves")
        if all(w["ready"] for w in listing["waves"]):
            return list(listing["waves"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"traces never gathered: {listing}")


# --- a dead server ------------------------------------------------------------------------


async def test_partial_wave_trace_names_who_is_missing(
    start_cluster: StartCluster, http: aiohttp.ClientSession
) -> None:
    cluster = start_cluster(TREE)
    cluster.stop_server("pine")
    tree = await get(http, cluster.balancer_url + "/api/tree")
    assert tree["complete"] is False
    assert {"pine", "ash", "elm"} <= set(tree["missing"])
    trace = await trace_of(http, cluster, tree["wave_id"])
    assert trace["complete"] is False
    assert trace["missing"] == ["pine"]  # no part from the dead server
    assert set(trace["wave_missing"]) == {"pine", "ash", "elm"}
    # What the others saw is there: oak explored pine, and nothing came back.
    to_pine = [m for m in messages(trace) if m["to"] == "pine"]
    assert [(m["from"], m["kind"], m["received"]) for m in to_pine] == [("oak", "explore", None)]
    assert trace["unreceived"] >= 1
    lanes = {m["from"] for m in messages(trace)} | {m["to"] for m in messages(trace)}
    assert "ash" not in lanes
    assert "elm" not in lanes
    listing = await get(http, cluster.balancer_url + "/api/waves")
    assert listing["waves"][0]["missing"] == ["pine"]


# --- the command ----------------------------------------------------------------------------


async def test_trace_command_prints_a_real_wave(
    dag: Cluster, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    from treewave.cli.main import main

    tree = await get(http, dag.balancer_url + "/api/tree")
    trace = await trace_of(http, dag, tree["wave_id"])

    code = await asyncio.to_thread(main, ["trace", "latest", "--balancer", dag.balancer_url])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith(f"echo wave {tree['wave_id']} · trace complete · 22 messages")
    assert len(out) == 2 + len(trace["events"])  # header, columns, one line per event
    assert out[-1].split()[1:3] == ["balancer", "DECIDES"]

    args = ["trace", tree["wave_id"], "--balancer", dag.balancer_url, "--shiviz"]
    code = await asyncio.to_thread(main, args)
    assert code == 0
    async with http.get(f"{dag.balancer_url}/api/waves/{tree['wave_id']}?format=shiviz") as r:
        assert capsys.readouterr().out == await r.text()

    code = await asyncio.to_thread(main, ["trace", "echo-x-1", "--balancer", dag.balancer_url])
    assert code == 1
    assert "unknown wave 'echo-x-1'" in capsys.readouterr().err
