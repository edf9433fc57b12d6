"""The wave-trace diagram on the status page, in a real headless Chromium against a real
cluster of 30 servers: every lane drawn, one arrow per message of the trace the API
serves, stepping reveals exactly one event, a new wave replaces the diagram live, and
the whole diagram is readable at 1280x800. Screenshots: artifacts/trace-echo.png and
trace-finn.png (the copies in docs/ illustrate docs/traces.md)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import open_page, wait_for
from tests.support.http import get_json
from treewave.core.randomtree import TreeShape, random_topology
from treewave.core.topology import Settings
from treewave.generator.words import random_names

pytestmark = pytest.mark.browser

DIAGRAM_JS = """
const svg = document.getElementById('trace-svg');
const panel = document.getElementById('trace-panel');
const marks = svg.querySelectorAll('.marks > *');
return {
  wave: svg.dataset.wave || null,
  lanes: Array.from(svg.querySelectorAll('g.lane')).map(g => g.dataset.name),
  arrows: svg.querySelectorAll('.marks line.msg').length,
  tree: svg.querySelectorAll('.marks line.msg.tree.explore').length,
  decisions: svg.querySelectorAll('.marks path.decide').length,
  marks: marks.length,
  shown: Array.from(svg.querySelectorAll('.marks .shown')).map(n => Number(n.dataset.i)),
  current: Array.from(svg.querySelectorAll('.marks .current')).map(n => Number(n.dataset.i)),
  pos: Number(panel.dataset.pos),
  total: Number(panel.dataset.total),
  posText: document.getElementById('trace-pos').textContent,
};
"""


def diagram(driver: Any) -> dict[str, Any]:
    result: dict[str, Any] = driver.execute_script(DIAGRAM_JS)
    return result


def new_wave(driver: Any, old: str | None, *click: str) -> Callable[[], str | None]:
    """Click (if asked), then a probe: the diagram's wave once it is another than `old`."""
    if click:
        driver.find_element(*click).click()

    def probe() -> str | None:
        wave: str | None = diagram(driver)["wave"]
        return wave if wave != old else None

    return probe


def open_trace_panel(driver: Any, url: str) -> None:
    """The status page at 1280x800, once its trace panel is there."""
    from selenium.webdriver.common.by import By

    open_page(driver, url)
    wait_for("the trace panel", lambda: driver.find_element(By.ID, "trace-panel"))


def whole_traced_wave(
    driver: Any, url: str, old: str | None, button: str
) -> tuple[str, dict[str, Any]]:
    """Click `button` until the wave it starts shows in the diagram with a whole trace.

    On a machine busy enough to stall a server past the deadline the wave itself is
    partial, or a server hands its part of the trace over after the balancer's step
    timeout and the trace is partial, naming it: neither is what this test is about
    (tests/integration/test_traces.py is), so such a wave is run again."""
    from selenium.webdriver.common.by import By

    trace: dict[str, Any] = {}
    for _attempt in range(5):
        old = wait_for("a traced wave in the diagram", new_wave(driver, old, By.ID, button), 60)
        trace = get_json(f"{url}/api/waves/{old}")
        if trace["wave_complete"] and trace["complete"]:
            return old, trace
    summary = {k: v for k, v in trace.items() if k != "events"}
    raise AssertionError(f"no whole traced wave in 5 tries; the last: {summary}")


def test_trace_diagram_draws_every_lane_and_message_and_steps_one_event(
    driver: Any, start_cluster: Callable[..., Any], tmp_path: Path, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    topo = random_topology(
        30,
        seed=11,
        shape=TreeShape(max_children=3, extra_parents=4, cpus=(2, 4), tasks=(0, 3)),
        names=random_names(30, 11),
        settings=Settings(task_time_s=900, rebalance_interval_s=0, wave_timeout_s=4),
    )
    cluster = start_cluster(topo, tmp_path / "cluster30", timeout_s=150)
    open_trace_panel(driver, cluster.balancer_url)

    # A wave started from the page is traced and shown live (it starts replaying).
    shown, trace = whole_traced_wave(driver, cluster.balancer_url, None, "trace-echo")
    assert trace["algorithm"] == "echo"
    summary = {k: v for k, v in trace.items() if k != "events"}
    assert trace["complete"] is True, summary
    driver.find_element(By.ID, "trace-pause").click()

    d = diagram(driver)
    assert d["lanes"] == ["balancer", *topo.names] == trace["lanes"]
    messages = [e for e in trace["events"] if e["kind"] != "decide"]
    assert d["arrows"] == len(messages) == 2 * topo.echo_edge_count
    assert d["decisions"] == 1
    assert d["marks"] == d["total"] == len(trace["events"])
    assert d["tree"] == len(topo.names)  # every server took a parent

    # Stepping advances exactly one event, in the trace's order.
    driver.find_element(By.ID, "trace-restart").click()
    d = diagram(driver)
    assert d["pos"] == 0
    assert d["shown"] == []
    for k in range(1, 4):
        driver.find_element(By.ID, "trace-step").click()
        d = diagram(driver)
        assert d["pos"] == k
        assert sorted(d["shown"]) == list(range(k))
        assert d["current"] == [k - 1]
        assert d["posText"] == f"{k} / {d['total']}"
    driver.find_element(By.ID, "trace-back").click()
    assert diagram(driver)["pos"] == 2

    # Play runs to the end (at 16x); then the tree is there and the balancer decided.
    driver.find_element(By.CSS_SELECTOR, "#trace-speed option[value='16']").click()
    driver.find_element(By.ID, "trace-play").click()
    wait_for("the replay to finish", lambda: diagram(driver)["pos"] == d["total"], timeout=60)
    stats = driver.execute_script(
        "return Array.from(document.querySelectorAll('#trace-svg g.lane'))"
        ".map(g => [g.dataset.name, g.querySelector('.lane-stats').textContent])"
    )
    parents = {name: text for name, text in stats}
    assert parents["balancer"] == "decided ✓"
    assert all(parents[n].startswith("← ") for n in topo.names), parents

    # Readable at 1280x800: the panel fills the window, every lane label on screen, no
    # overlaps, text not tiny, the whole wave without horizontal scrolling.
    driver.execute_script("document.getElementById('trace-panel').scrollIntoView()")
    labels = driver.execute_script(
        "return Array.from(document.querySelectorAll('#trace-svg g.lane .lane-name'))"
        ".map(t => { const r = t.getBoundingClientRect();"
        " return {y: r.y, h: r.height, x: r.x, w: r.width}; })"
    )
    assert len(labels) == 31
    for a, b in itertools.pairwise(labels):
        assert a["y"] + a["h"] <= b["y"] + 0.5, (a, b)
    for lab in labels:
        assert lab["h"] >= 11
        assert lab["y"] >= 0
        assert lab["y"] + lab["h"] <= 800
    box = driver.execute_script(
        "const b = document.getElementById('trace-box');"
        "return {sw: b.scrollWidth, cw: b.clientWidth, sh: b.scrollHeight, ch: b.clientHeight};"
    )
    assert box["sw"] <= box["cw"] + 1, box
    assert box["sh"] <= box["ch"] + 1, box
    driver.save_screenshot(str(artifacts / "trace-echo.png"))

    # Live: a Finn wave from the page replaces the diagram; each lane shows inc/ninc.
    driver.execute_script("window.scrollTo(0, 0)")
    _, finn = whole_traced_wave(driver, cluster.balancer_url, shown, "finn-button")
    assert finn["algorithm"] == "finn"
    d = diagram(driver)
    assert d["arrows"] == finn["messages"]
    assert d["decisions"] == len(topo.names) + 1
    # Replay to just past the middle for the screenshot: sets growing, some decided.
    driver.find_element(By.ID, "trace-pause").click()
    driver.execute_script(
        "window.treewaveTrace.pause();"
        "window.treewaveTrace.step(Math.floor(arguments[0] * 0.6)"
        " - window.treewaveTrace.state.pos)",
        d["total"],
    )
    stats = driver.execute_script(
        "return Array.from(document.querySelectorAll('#trace-svg g.lane .lane-stats'))"
        ".map(t => t.textContent)"
    )
    assert any(s.startswith("inc ") for s in stats)
    driver.execute_script("document.getElementById('trace-panel').scrollIntoView()")
    driver.save_screenshot(str(artifacts / "trace-finn.png"))


def test_beyond_30_servers_the_diagram_scrolls_and_stays_readable(
    driver: Any, start_cluster: Callable[..., Any], tmp_path: Path
) -> None:
    """60 servers do not fit 1280x800 at a readable size: the lanes keep their least height
    (labels at least 11 px, none overlapping) and the diagram scrolls inside its box; a
    lane scrolled to shows its label inside the box."""
    from selenium.webdriver.common.by import By

    topo = random_topology(
        60,
        seed=13,
        shape=TreeShape(max_children=3, extra_parents=2, cpus=(1, 2), tasks=(0, 1)),
        names=random_names(60, 13),
        settings=Settings(task_time_s=900, rebalance_interval_s=0, wave_timeout_s=6),
    )
    cluster = start_cluster(topo, tmp_path / "cluster60", timeout_s=240)
    open_trace_panel(driver, cluster.balancer_url)
    _, trace = whole_traced_wave(driver, cluster.balancer_url, None, "trace-echo")
    driver.find_element(By.ID, "trace-pause").click()
    d = diagram(driver)
    assert d["lanes"] == ["balancer", *topo.names]
    assert d["arrows"] == 2 * topo.echo_edge_count

    driver.execute_script("document.getElementById('trace-panel').scrollIntoView()")
    box = driver.execute_script(
        "const b = document.getElementById('trace-box');"
        "return {sh: b.scrollHeight, ch: b.clientHeight};"
    )
    assert box["sh"] > box["ch"] + 50, box  # it scrolls rather than squeezing 61 lanes
    labels = driver.execute_script(
        "return Array.from(document.querySelectorAll('#trace-svg g.lane .lane-name'))"
        ".map(t => { const r = t.getBoundingClientRect(); return {y: r.y, h: r.height}; })"
    )
    assert len(labels) == 61
    for a, b in itertools.pairwise(labels):
        assert a["y"] + a["h"] <= b["y"] + 0.5, (a, b)
    assert min(lab["h"] for lab in labels) >= 11

    # The last lane, scrolled to, is inside the box.
    inside = driver.execute_script(
        "const b = document.getElementById('trace-box'); b.scrollTop = b.scrollHeight;"
        "const names = document.querySelectorAll('#trace-svg g.lane .lane-name');"
        "const last = names[names.length - 1].getBoundingClientRect();"
        "const r = b.getBoundingClientRect();"
        "return last.top >= r.top && last.bottom <= r.bottom;"
    )
    assert inside is True
    assert trace["complete"] is True
