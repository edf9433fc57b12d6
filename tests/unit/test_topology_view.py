"""A server's view of the topology (what it takes at start) and the diff between two
topologies: what a deployment restarts, starts and drains on a change."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from treewave.core.randomtree import random_topology
from treewave.core.topology import ServerSpec, ServerView, Settings, Topology


def topo(*servers: tuple[str, int, tuple[str, ...]], **settings: float) -> Topology:
    return Topology.from_servers(
        [ServerSpec(name=n, cpus=c, children=k) for n, c, k in servers], Settings(**settings)
    )


def diamond(left_cpus: int = 1, **settings: float) -> Topology:
    """root -> left, right -> leaf (leaf has two parents)."""
    return topo(
        ("root", 2, ("left", "right")),
        ("left", left_cpus, ("leaf",)),
        ("right", 3, ("leaf",)),
        ("leaf", 1, ()),
        **settings,
    )


TREE = diamond()


def test_a_view_is_cpus_neighbours_rootness_and_settings() -> None:
    assert TREE.view("root") == ServerView(
        cpus=2, parents=(), children=("left", "right"), root=True, settings=TREE.settings
    )
    leaf = TREE.view("leaf")
    assert leaf.parents == ("left", "right")
    assert leaf.children == ()
    assert not leaf.root
    assert leaf.to_json_data() == {
        "cpus": 1,
        "parents": ["left", "right"],
        "children": [],
        "root": False,
        "settings": TREE.settings.model_dump(mode="json"),
    }


def test_the_diff_names_added_removed_and_changed_servers() -> None:
    new = topo(
        ("root", 2, ("left", "extra")),
        ("left", 1, ("leaf",)),
        ("extra", 1, ()),
        ("leaf", 1, ()),
    )
    change = TREE.diff(new)
    assert change.added == ("extra",)
    assert change.removed == ("right",)
    # root: new children; leaf: lost a parent; left: untouched.
    assert change.changed == ("root", "leaf")
    assert not change.settings_changed
    assert not change.empty


def test_a_settings_change_changes_every_view() -> None:
    change = TREE.diff(diamond(wave_timeout_s=9))
    assert change.settings_changed
    assert change.changed == TREE.names
    assert change.added == change.removed == ()


def test_more_cpus_changes_only_that_server() -> None:
    assert TREE.diff(diamond(left_cpus=4)).changed == ("left",)


def test_the_same_servers_in_another_order_is_no_change() -> None:
    # left still comes before right, so leaf's parents keep their order.
    shuffled = topo(
        ("leaf", 1, ()),
        ("root", 2, ("left", "right")),
        ("left", 1, ("leaf",)),
        ("right", 3, ("leaf",)),
    )
    assert shuffled.to_json_data() != TREE.to_json_data()
    assert TREE.diff(shuffled).empty


@settings(max_examples=50)
@given(st.integers(2, 20), st.integers(2, 20), st.integers(0, 10_000), st.integers(0, 10_000))
def test_a_diff_accounts_for_every_server(n_old: int, n_new: int, s_old: int, s_new: int) -> None:
    # Names s0, s1, ... so that the two trees share their first servers.
    old = random_topology(n_old, seed=s_old, names=[f"s{i}" for i in range(n_old)])
    new = random_topology(n_new, seed=s_new, names=[f"s{i}" for i in range(n_new)])
    change = old.diff(new)
    kept = [n for n in new.names if n in old]
    assert set(change.added) | set(kept) == set(new.names)
    assert set(change.removed) | set(kept) == set(old.names)
    assert not set(change.added) & set(old.names)
    assert not set(change.removed) & set(new.names)
    assert set(change.changed) == {n for n in kept if old.view(n) != new.view(n)}
    assert old.diff(old).empty
    # Going back undoes it.
    back = new.diff(old)
    assert (back.added, back.removed) == (change.removed, change.added)
    assert set(back.changed) == set(change.changed)
