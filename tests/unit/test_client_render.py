"""The CLI's tree view and summaries: pure functions of the balancer's JSON."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from treewave.cli.client_cmd import (
    load_bar,
    load_text,
    render_finn,
    render_migration,
    render_rebalance,
    render_tree,
    summary_line,
)
from treewave.core.load import load_level


def node(name: str, cpus: int, running: int = 0, queued: int = 0) -> dict[str, Any]:
    """A server as the API reports it, every task 1 s of expected work, overloaded at 100 %
    tasks per CPU."""
    work = float(running + queued)
    return {
        "name": name,
        "cpus": cpus,
        "running": running,
        "queued": queued,
        "completed": 0,
        "expected_work_s": work,
        "pressure": work / cpus,
        "level": load_level(running, queued, cpus, 100),
    }


def tree(
    nodes: list[dict[str, Any]],
    edges: list[tuple[str, str]],
    missing: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "wave_id": "echo-1",
        "complete": not missing,
        "missing": missing or [],
        "messages": 2 * (len(edges) + 1),
        "duration_s": 0.0042,
        "nodes": nodes,
        "edges": [{"source": a, "target": b} for a, b in edges],
    }


DIAMOND = tree(
    [node("alpha", 2, 1, 0), node("beta", 1, 1, 6), node("gamma", 2), node("delta", 4, 2, 1)],
    [("alpha", "beta"), ("alpha", "gamma"), ("beta", "delta"), ("gamma", "delta")],
)


def full_line(text: str, name: str) -> str:
    """The line that draws `name` with its bar (not a back-reference)."""
    plain = re.compile(rf"(^|─ ){name}\s+(\x1b\[\d+m)?\[")
    lines = [line for line in text.splitlines() if plain.search(line)]
    assert len(lines) == 1, (name, text)
    return lines[0]


# --- bars ----------------------------------------------------------------------------------------


def test_bar_shows_running_queued_and_free_in_proportion_to_the_cpus() -> None:
    assert load_bar(2, 1, 4, width=12) == "[██████▓▓▓░░░] "
    assert load_bar(0, 0, 4, width=8) == "[░░░░░░░░] "
    assert load_bar(4, 0, 4, width=8) == "[████████] "


def test_bar_marks_work_beyond_capacity() -> None:
    assert load_bar(1, 6, 1, width=8) == "[████████]+"
    # Running work alone never exceeds the cpus, but queued work can: both are visible.
    bar = load_bar(2, 10, 4, width=8)
    assert bar == "[████▓▓▓▓]+"


def test_small_loads_are_never_invisible() -> None:
    assert load_bar(1, 0, 100, width=10) == "[█░░░░░░░░░] "
    assert load_bar(0, 1, 100, width=10) == "[▓░░░░░░░░░] "
    assert load_bar(1, 1, 100, width=10) == "[█▓░░░░░░░░] "


def test_load_text() -> None:
    assert load_text(0, 0, 1) == "idle / 1 cpu"
    assert load_text(2, 1, 4) == "2 run + 1 queued / 4 cpus"


# --- the tree ------------------------------------------------------------------------------


def test_every_server_appears_with_its_own_bar_and_numbers() -> None:
    text = render_tree(DIAMOND)
    assert "\x1b[" not in text  # no colour unless asked
    assert full_line(text, "alpha").startswith("alpha ")
    assert "1 run + 6 queued / 1 cpu" in full_line(text, "beta")
    assert full_line(text, "beta").split("]")[1].startswith("+")
    assert "idle / 2 cpus" in full_line(text, "gamma")
    assert "2 run + 1 queued / 4 cpus" in full_line(text, "delta")


def test_a_server_with_two_parents_is_drawn_once_and_referenced_under_the_other() -> None:
    text = render_tree(DIAMOND)
    lines = text.splitlines()
    assert lines[0].startswith("alpha")
    assert lines[1].startswith("├── beta")
    assert lines[2].startswith("│   └── delta")
    assert "(also under gamma)" in lines[2]
    assert lines[3].startswith("└── gamma")
    assert lines[4].startswith("    └── ↑ delta")
    assert "(drawn under beta)" in lines[4]
    assert "[" not in lines[4]  # a reference carries no second bar
    assert len(lines) == 6  # 5 tree lines (4 edges + the root) and the summary


def test_bars_line_up_in_one_column() -> None:
    text = render_tree(DIAMOND)
    columns = {line.index("[") for line in text.splitlines()[:4]}
    assert len(columns) == 1


def test_summary_line_counts_and_imbalance() -> None:
    line = summary_line(DIAMOND)
    # total 4 running + 7 queued on 9 cpus; max pressure is beta's 7/1.
    assert line.startswith("4 servers · 4 running + 7 queued / 9 cpus")
    assert f"imbalance {7 - 11 / 9:.2f}" in line
    assert "max pressure 7.00 s/cpu" in line
    assert "(11.0 s of work)" in line
    assert "complete" in line
    assert "echo 4.2 ms, 10 messages" in line
    assert render_tree(DIAMOND).splitlines()[-1] == line


def test_partial_wave_names_the_missing_servers_and_draws_them_without_numbers() -> None:
    partial = tree(
        [node("alpha", 2), node("beta", 1)],
        [("alpha", "beta"), ("alpha", "gamma"), ("gamma", "delta")],
        missing=["delta", "gamma"],
    )
    text = render_tree(partial)
    for name in ("alpha", "beta", "gamma", "delta"):
        assert name in text
    gamma = next(line for line in text.splitlines() if "gamma" in line)
    assert "no answer" in gamma
    assert "partial, missing delta, gamma" in text.splitlines()[-1]
    assert text.splitlines()[-1].startswith("4 servers")


def test_colour_paints_bars_by_the_reported_level() -> None:
    text = render_tree(DIAMOND, colour=True)
    assert "\x1b[31m[" in full_line(text, "beta")  # overloaded (level 5): red
    assert "\x1b[32m[" in full_line(text, "gamma")  # idle (level 0): green
    assert "\x1b[32m[" in full_line(text, "alpha")  # 1 task / 2 cpus (level 3): green
    busy = tree([{**node("alpha", 4, 3, 0), "level": 4}], [])
    assert "\x1b[33m[" in full_line(render_tree(busy, colour=True), "alpha")  # level 4: yellow


@st.composite
def dags(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 25))
    names = [f"s{i}" for i in range(n)]
    edges: list[tuple[str, str]] = []
    for i in range(1, n):
        parents = draw(st.sets(st.integers(0, i - 1), min_size=1, max_size=min(3, i)))
        edges += [(names[p], names[i]) for p in sorted(parents)]
    nodes = [
        node(name, draw(st.integers(1, 8)), draw(st.integers(0, 8)), draw(st.integers(0, 20)))
        for name in names
    ]
    return tree(nodes, edges)


@settings(max_examples=200, deadline=None)
@given(dags())
def test_any_dag_draws_every_server_once_with_one_reference_per_extra_parent(
    data: dict[str, Any],
) -> None:
    text = render_tree(data, bar_width=10)
    lines = text.splitlines()[:-1]
    full = [line for line in lines if "[" in line]
    refs = [line for line in lines if "↑" in line]
    assert len(full) == len(data["nodes"])
    for n in data["nodes"]:
        assert sum(1 for line in full if re.search(rf"(^|─ ){n['name']}\s", line)) == 1
    # One line per edge (the first reaches the server, the others refer to it) + the root.
    assert len(lines) == len(data["edges"]) + 1
    assert len(refs) == len(data["edges"]) - (len(data["nodes"]) - 1)
    for line in full:
        bar = line[line.index("[") : line.index("]") + 1]
        assert len(bar) == 12


def test_finn_and_rebalance_summaries() -> None:
    finn = render_finn(
        {
            "wave_id": "finn-1",
            "complete": True,
            "decided": ["a", "b", "c"],
            "missing": [],
            "messages": 9,
            "duration_s": 0.0123,
            "tasks_per_node": 2,
        }
    )
    assert finn == (
        "finn wave finn-1: complete, 3 servers decided, 2 tasks each (6 queued), "
        "9 messages in 12.3 ms"
    )
    partial = render_finn(
        {"wave_id": "f", "complete": False, "decided": ["a"], "missing": ["b"], "messages": 1}
    )
    assert "partial" in partial
    assert "did not decide): b" in partial

    moved = render_rebalance(
        {
            "moves": [{"source": "beta", "target": "alpha", "tasks": 2}],
            "planned": [{"source": "beta", "target": "alpha", "tasks": 3}],
            "max_pressure_before": 7.0,
            "max_pressure_after": 4.0,
            "missing": [],
        }
    )
    assert moved.splitlines()[0] == "moved 2 tasks in 1 move; max pressure 7.00 -> 4.00 s/cpu"
    assert "beta -> alpha: 2" in moved
    assert "1 planned task moves did not happen" in moved
    assert render_rebalance(
        {"moves": [], "max_pressure_before": 0.5, "max_pressure_after": 0.5}
    ).startswith("nothing to move")


def test_render_migration_shows_retiring_servers_and_what_they_hold() -> None:
    migration = {
        "state": "draining",
        "drain_grace_s": 30.0,
        "retiring": {
            "oak": {
                "queued": 4,
                "running": 2,
                "reserved": 3,
                "held": True,
                "reported": True,
                "moved": 11,
                "requeued": 0,
                "grace_left_s": 12.4,
            },
            "elm": {"queued": None, "running": None, "reported": False, "grace_left_s": 30},
            "ash": {"queued": 0, "running": 1, "reported": True, "moved": 0, "grace_left_s": 0},
        },
        "retired": {"fir": {"moved": 3, "completed": 0, "requeued": 0}},
        "releasing": ["pine"],
    }
    assert render_migration(migration).splitlines() == [
        "draining: 3 retiring servers (drain grace 30 s); they take no new tasks and hand "
        "their queue to the new topology",
        "  ash  retiring: 1 running + 0 queued · moved 0 · grace over",
        "  elm  not reported yet",
        "  oak  retiring: 2 running + 4 queued + 3 moving · moved 11 · grace left 12 s",
        "back in the topology (hold being lifted): pine",
    ]
    steady = {"state": "steady", "retiring": {}, "retired": {"fir": {}}, "releasing": []}
    assert render_migration(steady) == ""
