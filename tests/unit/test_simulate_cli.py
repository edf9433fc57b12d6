"""`treewave simulate`: the JSON report's shape and its guarantees."""

from __future__ import annotations

import json

import pytest

from treewave.cli.main import main
from treewave.cli.simulate_cmd import simulate

ECHO_KEYS = {"messages", "participants", "decided"}
FINN_KEYS = {"messages", "decided_nodes", "decided_once", "decided"}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    code = main(["simulate", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    assert isinstance(report, dict)
    return report


def test_simulate_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    report = run_json(capsys, "--nodes", "200", "--seed", "3")
    assert set(report) == {"nodes", "edges", "echo", "finn"}
    echo, finn = report["echo"], report["finn"]
    assert isinstance(echo, dict)
    assert isinstance(finn, dict)
    assert set(echo) >= ECHO_KEYS
    assert set(finn) >= FINN_KEYS
    assert report["nodes"] == 200
    edges = report["edges"]
    assert isinstance(edges, int)
    assert edges >= 200  # 199 tree edges + the balancer's link + extra parents
    assert echo["messages"] == 2 * edges
    assert echo["participants"] == 200
    assert echo["decided"] is True
    assert finn["decided"] is True
    assert finn["decided_once"] is True
    assert finn["decided_nodes"] == 200
    assert isinstance(finn["messages"], int)
    if "directed_edges" in finn:
        assert finn["messages"] >= finn["directed_edges"]
    if "balancer_last" in finn:
        assert finn["balancer_last"] is True


def test_simulate_is_reproducible(capsys: pytest.CaptureFixture[str]) -> None:
    def strip(report: dict[str, object]) -> dict[str, object]:
        return {
            k: {kk: vv for kk, vv in v.items() if kk != "seconds"} if isinstance(v, dict) else v
            for k, v in report.items()
        }

    a = run_json(capsys, "--nodes", "60", "--seed", "9")
    b = run_json(capsys, "--nodes", "60", "--seed", "9")
    assert strip(a) == strip(b)


@pytest.mark.parametrize("seed", range(8))
def test_simulate_on_trees_and_dags(seed: int) -> None:
    tree = simulate(150, seed, max_children=2, extra=0)
    dag = simulate(150, seed, max_children=4, extra=40)
    for report in (tree, dag):
        assert report["echo"]["messages"] == 2 * report["edges"]
        assert report["echo"]["decided"]
        assert report["finn"]["decided"]
        assert report["finn"]["decided_once"]
    # On a tree Finn sends exactly one message per directed edge.
    assert tree["finn"]["messages"] == tree["finn"]["directed_edges"]
    assert dag["finn"]["messages"] >= dag["finn"]["directed_edges"]


def test_simulate_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--nodes", "30", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "30 servers" in out
    assert "echo:" in out
    assert "finn:" in out


@pytest.mark.parametrize("nodes", ["0", "-3", "many"])
def test_bad_node_count_is_a_usage_error(capsys: pytest.CaptureFixture[str], nodes: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--nodes", nodes])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--nodes" in err


def test_missing_node_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate"])
    assert info.value.code == 2
    assert "--nodes" in capsys.readouterr().err
