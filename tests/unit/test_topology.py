"""The topology file: every error class names the server and the field; good files load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treewave.core.topology import RESERVED_NAMES, Topology, TopologyError
from treewave.wire.topology_file import load_topology

REPO = Path(__file__).resolve().parents[2]


def server(
    name: str, cpus: Any = 1, children: tuple[str, ...] = (), **extra: Any
) -> dict[str, Any]:
    return {"name": name, "cpus": cpus, "children": list(children), **extra}


def problems_of(data: Any) -> list[str]:
    with pytest.raises(TopologyError) as info:
        Topology.parse(data)
    assert info.value.problems, "a TopologyError must list at least one problem"
    # The exception text lists every problem, one per line.
    for p in info.value.problems:
        assert p in str(info.value)
    return info.value.problems


def only_problem(data: Any) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


# --- graph checks -----------------------------------------------------------------------


def test_unknown_child_names_server_and_child() -> None:
    p = only_problem({"servers": [server("alpha", children=("ghost",))]})
    assert "'alpha'" in p
    assert "children" in p
    assert "unknown child 'ghost'" in p


def test_duplicate_name_names_index_and_name() -> None:
    p = only_problem(
        {"servers": [server("alpha", children=("beta",)), server("beta"), server("beta")]}
    )
    assert "servers[2]" in p
    assert ".name" in p
    assert "duplicate server name 'beta'" in p


@pytest.mark.parametrize("name", ["Alpha", "al_pha", "-alpha", "alpha-", "a" * 64, "", "al pha"])
def test_non_dns_safe_name(name: str) -> None:
    p = only_problem({"servers": [server(name)]})
    assert "servers[0]" in p
    assert ".name" in p
    assert repr(name) in p
    assert "DNS-safe" in p


@pytest.mark.parametrize("name", sorted(RESERVED_NAMES))
def test_reserved_name(name: str) -> None:
    assert {"balancer", "prometheus", "grafana"} == RESERVED_NAMES
    p = only_problem({"servers": [server("root", children=(name,)), server(name)]})
    assert "servers[1]" in p
    assert repr(name) in p
    assert "reserved" in p


def test_self_child() -> None:
    p = only_problem({"servers": [server("alpha", children=("alpha",))]})
    assert "'alpha'.children" in p
    assert "own child" in p


def test_child_listed_twice() -> None:
    data = {"servers": [server("alpha", children=("beta", "beta")), server("beta")]}
    p = only_problem(data)
    assert "'alpha'.children" in p
    assert "'beta' listed twice" in p


def test_zero_roots_cycle_through_all() -> None:
    data = {
        "servers": [
            server("alpha", children=("beta",)),
            server("beta", children=("gamma",)),
            server("gamma", children=("alpha",)),
        ]
    }
    problems = problems_of(data)
    assert any(p.startswith("no root") for p in problems), problems
    cycles = [p for p in problems if p.startswith("cycle:")]
    assert cycles == ["cycle: alpha -> beta -> gamma -> alpha"]


def test_several_roots_are_named() -> None:
    data = {"servers": [server("alpha", children=("gamma",)), server("beta"), server("gamma")]}
    p = only_problem(data)
    assert "several roots" in p
    assert "alpha" in p
    assert "beta" in p
    assert "gamma" not in p


def test_cycle_below_the_root_shows_its_path() -> None:
    data = {
        "servers": [
            server("root", children=("alpha",)),
            server("alpha", children=("beta",)),
            server("beta", children=("gamma",)),
            server("gamma", children=("alpha",)),
        ]
    }
    # Every server is reachable from the root here; the only problem is the cycle.
    assert only_problem(data) == "cycle: alpha -> beta -> gamma -> alpha"


def test_unreachable_servers_in_a_cycle_component() -> None:
    # With exactly one root and no cycle every server is reachable (walk parents upward),
    # so an unreachable server needs a component of its own, and a component without a
    # root is a cycle: `root -> leaf` plus `alpha <-> beta`.
    data = {
        "servers": [
            server("root", children=("leaf",)),
            server("leaf"),
            server("alpha", children=("beta",)),
            server("beta", children=("alpha",)),
        ]
    }
    problems = problems_of(data)
    assert "cycle: alpha -> beta -> alpha" in problems
    assert "unreachable from the root 'root': alpha, beta" in problems
    assert len(problems) == 2


# --- field checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expect"),
    [
        ("cpus", 0, "greater than or equal to 1"),
        ("cpus", 2000, "less than or equal to 1024"),
        ("cpus", "four", "valid integer"),
        ("cpus", "4", "valid integer"),
        ("cpus", True, "valid integer"),
        ("cpus", 1.5, "valid integer"),
        ("cpus", None, "valid integer"),
        ("tasks", -1, "greater than or equal to 0"),
        ("tasks", "many", "valid integer"),
        ("children", "beta", "valid tuple"),
        ("children", [1], "valid string"),
    ],
)
def test_bad_server_numbers_and_types(field: str, value: Any, expect: str) -> None:
    spec = server("alpha")
    spec[field] = value
    p = only_problem({"servers": [spec]})
    assert p.startswith(f"servers[0] ('alpha').{field}"), p
    assert expect in p


def test_missing_cpus() -> None:
    p = only_problem({"servers": [{"name": "alpha"}]})
    assert p.startswith("servers[0] ('alpha').cpus")
    assert "required" in p.lower()


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("task_time_s", 0, "greater than 0"),
        ("task_time", -1, "greater than 0"),
        ("rebalance_interval", "soon", "valid number"),
        ("max_cpu", 0, "greater than 0"),
        ("wave_timeout_s", 601, "less than or equal to 600"),
        ("drain_grace_s", -1, "greater than or equal to 0"),
        ("drain_grace_s", 86401, "less than or equal to 86400"),
    ],
)
def test_bad_settings(key: str, value: Any, expect: str) -> None:
    p = only_problem({"settings": {key: value}, "servers": [server("alpha")]})
    assert p.startswith(f"settings.{key}"), p
    assert expect in p


def test_unknown_key_in_server() -> None:
    p = only_problem({"servers": [server("alpha", colour="red")]})
    assert p == "servers[0] ('alpha').colour: unknown key"


def test_unknown_key_in_settings() -> None:
    p = only_problem({"settings": {"speed": 3}, "servers": [server("alpha")]})
    assert p == "settings.speed: unknown key"


def test_unknown_top_level_key() -> None:
    p = only_problem({"servers": [server("alpha")], "links": []})
    assert p == "links: unknown key"


def test_empty_servers_list() -> None:
    p = only_problem({"servers": []})
    assert p.startswith("servers:")
    assert "at least 1" in p


def test_missing_servers_and_not_an_object() -> None:
    assert only_problem({}).startswith("servers:")
    assert "dictionary" in only_problem([])


def test_every_problem_listed_at_once() -> None:
    # Three field problems in three places: all three are reported.
    data = {
        "settings": {"max_cpu": 0},
        "servers": [server("alpha", cpus=0, children=("beta",)), server("beta", tasks=-2)],
    }
    problems = problems_of(data)
    assert len(problems) == 3, problems
    assert problems[0].startswith("settings.max_cpu")
    assert problems[1].startswith("servers[0] ('alpha').cpus")
    assert problems[2].startswith("servers[1] ('beta').tasks")


def test_every_graph_problem_listed_at_once() -> None:
    # Three problems found by the name and link checks and one by the root check: all
    # four are reported (a bad link does not hide the roots it leaves).
    data = {
        "servers": [
            server("alpha", children=("ghost", "grafana")),
            server("grafana"),
            server("Beta"),
        ]
    }
    problems = problems_of(data)
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "'grafana' is reserved" in text
    assert "'Beta' is not DNS-safe" in text
    assert "unknown child 'ghost'" in text
    assert "several roots (Beta, alpha)" in text


def test_schema_and_graph_problems_listed_together() -> None:
    # A bad value (schema) and a cycle and an unknown child (graph) in one file: one
    # TopologyError lists all of them, each naming its server.
    data = {
        "settings": {"wave_timeout_s": 0},
        "servers": [
            server("root", children=("a",)),
            {"name": "a", "cpus": 0, "children": ["b"]},
            server("b", children=("a", "ghost")),
        ],
    }
    problems = problems_of(data)
    text = "\n".join(problems)
    assert "settings.wave_timeout_s" in text
    assert "servers[1] ('a').cpus" in text
    assert "unknown child 'ghost'" in text
    assert "cycle: a -> b -> a" in text
    assert len(problems) == 4, problems


def test_graph_checks_skip_a_file_without_readable_names() -> None:
    # An entry without a name: its children cannot be told from unknown ones, so only
    # the schema problem is reported (no invented "unknown child").
    data = {"servers": [server("root", children=("x",)), {"cpus": 1}]}
    assert problems_of(data) == ["servers[1].name: Field required"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_settings_are_refused(value: str) -> None:
    problems = problems_of({"settings": {"task_time_s": float(value)}, "servers": [server("a")]})
    assert len(problems) == 1, problems
    assert problems[0].startswith("settings.task_time_s:")


# --- files ---------------------------------------------------------------------------------


def test_malformed_json_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.json"
    path.write_text('{"servers": [\n  {"name": "alpha",,}\n]}\n')
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    [p] = info.value.problems
    assert p.startswith("malformed JSON at line 2, column")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    [p] = info.value.problems
    assert "cannot read the file" in p
    assert "No such file" in p
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read the file"):
        load_topology(tmp_path)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.json"
    path.write_bytes(b"\xff\xfe\x00\x01 not text")
    with pytest.raises(TopologyError, match="not UTF-8 text"):
        load_topology(path)


def test_deeply_nested_json(tmp_path: Path) -> None:
    path = tmp_path / "topology.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TopologyError, match="nested too deeply"):
        load_topology(path)


def test_lab_aliases_accepted(tmp_path: Path) -> None:
    path = tmp_path / "topology.json"
    data = {
        "settings": {"task_time": 3, "rebalance_interval": 7.5, "max_cpu": 80},
        "servers": [server("alpha", cpus=2, children=("beta",)), server("beta")],
    }
    path.write_text(json.dumps(data))
    topo = load_topology(path)
    assert topo.settings.task_time_s == 3.0
    assert topo.settings.rebalance_interval_s == 7.5
    assert topo.settings.overload_percent == 80.0
    # Our own names work too, and the canonical dump uses them.
    ours = Topology.parse(
        {
            "settings": {"task_time_s": 3, "rebalance_interval_s": 7.5, "overload_percent": 80},
            "servers": data["servers"],
        }
    )
    assert ours.settings == topo.settings
    assert set(ours.to_json_data()["settings"]) == {
        "task_time_s",
        "rebalance_interval_s",
        "overload_percent",
        "wave_timeout_s",
        "queue_order",
        "drain_grace_s",
        "policy",
    }


def test_committed_topology_loads() -> None:
    topo = load_topology(REPO / "topology.json")
    assert 8 <= len(topo) <= 12
    assert any(len(topo.parents(n)) >= 2 for n in topo.names)
    assert topo.parents(topo.root) == ()
    assert topo.root == topo.names[0]
    # Round trip through the canonical dump.
    assert Topology.parse(json.loads(topo.dumps())) == topo


def test_derived_graph_facts() -> None:
    topo = Topology.parse(
        {
            "servers": [
                server("root", children=("alpha", "beta")),
                server("alpha", children=("gamma",)),
                server("beta", children=("gamma",)),
                server("gamma"),
            ]
        }
    )
    assert topo.root == "root"
    assert topo.parents("gamma") == ("alpha", "beta")
    assert topo.leaves == ("gamma",)
    assert topo.echo_neighbours("root") == ("balancer", "alpha", "beta")
    assert topo.echo_neighbours("gamma") == ("alpha", "beta")
    assert topo.finn_in("root") == ("balancer",)
    assert topo.finn_out("gamma") == ("balancer",)
    assert topo.echo_edge_count == 5
    assert topo.finn_edge_count == 4 + 1 + 1
    assert topo.depth == 2
    assert topo.total_cpus == 4


# --- robustness ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
names = st.sampled_from(["alpha", "beta", "gamma", "balancer", "Bad", ""]) | st.text(max_size=5)
server_like = st.fixed_dictionaries(
    {"name": names | json_values},
    optional={
        "cpus": st.integers(-2, 3) | json_values,
        "tasks": st.integers(-2, 3) | json_values,
        "children": st.lists(names, max_size=3) | json_values,
        "colour": json_values,
    },
)
topology_like = st.fixed_dictionaries(
    {"servers": st.lists(server_like, max_size=5) | json_values},
    optional={
        "settings": st.dictionaries(
            st.sampled_from(["task_time", "task_time_s", "max_cpu", "wave_timeout_s", "x"]),
            json_values,
            max_size=3,
        )
        | json_values
    },
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=json_values | topology_like)
def test_load_topology_only_raises_topology_error(tmp_path: Path, data: Any) -> None:
    path = tmp_path / "random.json"
    path.write_text(json.dumps(data))
    problems: list[str] = []
    try:
        topo = load_topology(path)
    except TopologyError as exc:
        problems = exc.problems
        assert problems, "a TopologyError lists at least one problem"
    else:
        assert len(topo) >= 1
        assert topo.root in topo
    assert all(isinstance(p, str) and p for p in problems)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.text(max_size=40).map(str.encode) | st.binary(max_size=40))
def test_load_topology_random_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "random.json"
    path.write_bytes(raw)
    with pytest.raises(TopologyError):
        load_topology(path)
