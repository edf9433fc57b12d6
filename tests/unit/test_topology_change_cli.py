"""What makes Compose recreate the right services after a topology change, and the pure parts
of `treewave apply` (its answers from `GET /api/topology`, its progress bars, bad input)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from treewave.cli.apply_cmd import signal_local_run
from treewave.cli.errors import CommandError
from treewave.cli.main import main
from treewave.core.topology import ServerSpec, Settings, Topology
from treewave.generator.render import render, topology_hash, view_hash
from treewave.wire.topology_api import TopologyApiError, TopologyState
from treewave.wire.topology_change import drain_line

REPO = Path(__file__).resolve().parents[2]


def topo(*servers: tuple[str, int, tuple[str, ...]], grace: float = 30.0) -> Topology:
    return Topology.from_servers(
        [ServerSpec(name=n, cpus=c, children=k) for n, c, k in servers],
        Settings(drain_grace_s=grace),
    )


A = topo(("root", 2, ("left", "right")), ("left", 1, ()), ("right", 1, ()))


def views(t: Topology) -> dict[str, str]:
    return {n: view_hash(t, n) for n in t.names}


def test_view_hashes_change_only_for_the_servers_whose_view_changed() -> None:
    more_cpus = topo(("root", 2, ("left", "right")), ("left", 3, ()), ("right", 1, ()))
    changed = {n for n in A.names if views(A)[n] != views(more_cpus)[n]}
    assert changed == {"left"}
    # A new child changes its parent's view and nobody else's among the kept servers.
    grown = topo(
        ("root", 2, ("left", "right")), ("left", 1, ("new",)), ("right", 1, ()), ("new", 1, ())
    )
    assert {n for n in A.names if views(A)[n] != views(grown)[n]} == {"left"}
    # Settings reach every server.
    slower = topo(("root", 2, ("left", "right")), ("left", 1, ()), ("right", 1, ()), grace=5)
    assert all(views(A)[n] != views(slower)[n] for n in A.names)
    for other in (more_cpus, grown, slower):
        assert topology_hash(other) != topology_hash(A)
    assert topology_hash(
        topo(("root", 2, ("left", "right")), ("left", 1, ()), ("right", 1, ()))
    ) == (topology_hash(A))


def test_the_rendered_compose_file_carries_the_hashes(tmp_path: Path) -> None:
    (tmp_path / "topology.json").write_text(A.dumps())
    render(A, "topology.json", tmp_path, template=REPO / "compose.template.yml")
    services = yaml.safe_load((tmp_path / "compose.yml").read_text())["services"]
    assert services["balancer"]["labels"] == {"treewave.topology": topology_hash(A)}
    for name in A.names:
        assert services[name]["labels"] == {"treewave.view": view_hash(A, name)}


def retiring(queued: int | None, running: int | None) -> dict[str, object]:
    """A retiring server as `GET /api/topology` reports it (None: not reported yet)."""
    reported = queued is not None
    return {
        "queued": queued,
        "running": running,
        "reserved": 0 if reported else None,
        "held": reported,
        "reported": reported,
        "moved": 0,
        "requeued": 0,
        "grace_left_s": 30.0,
    }


def test_topology_state_and_progress_bars() -> None:
    done = {"completed": 0, "requeued": 0}
    body = {
        "topology": A.to_json_data(),
        "migration": {
            "state": "draining",
            "drain_grace_s": 30.0,
            "retiring": {"old": retiring(6, 2), "quiet": retiring(None, None)},
            "retired": {"gone": {"moved": 4, **done}, "root": {"moved": 0, **done}},
            "releasing": [],
        },
    }
    state = TopologyState.parse(body)
    assert state.is_retired("gone")
    assert not state.is_retired("root")  # back in the topology: not to be removed
    assert not state.is_retired("old")
    start: dict[str, int] = {}
    assert drain_line("old", state, start).endswith("[" + "-" * 30 + "] 8 left of 8")
    assert "waiting for its report" in drain_line("quiet", state, start)
    later = TopologyState.parse(
        {
            **body,
            "migration": {
                **body["migration"],
                "retiring": {"old": retiring(2, 0)},
            },
        }
    )
    assert drain_line("old", later, start).endswith("[" + "#" * 22 + "-" * 8 + "] 2 left of 8")
    assert drain_line("gone", later, start).endswith("retired")
    with pytest.raises(TopologyApiError, match="unexpected"):
        TopologyState.parse({"topology": {}})


def test_apply_with_an_invalid_file_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "topology.json"
    bad.write_text('{"servers": [{"name": "a", "cpus": 0, "children": ["b"]}]}')
    assert main(["apply", "--topology", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "is not a valid topology; nothing changed" in err
    assert "cpus" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topology.json"]


def test_apply_local_without_a_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="no running `treewave run` supervises"):
        signal_local_run(tmp_path / "topology.json")
