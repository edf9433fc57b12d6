"""The topology file: the one source of truth for servers, links and settings.

Loading validates everything and reports *every* problem at once, shape and graph problems
together, each naming the server and the field, so a bad file gives a readable list
instead of a traceback.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from treewave.core.ledger import QueueOrder

__all__ = [
    "BALANCER",
    "DNS_LABEL",
    "RESERVED_NAMES",
    "ServerSpec",
    "ServerView",
    "Settings",
    "Topology",
    "TopologyDiff",
    "TopologyError",
    "TopologyFile",
    "parse_topology_text",
]

BALANCER = "balancer"
"""Name the balancer goes by in waves; reserved, like the other compose service names."""

RESERVED_NAMES = frozenset({BALANCER, "prometheus", "grafana"})
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class TopologyError(ValueError):
    """A topology file that cannot be used; `problems` lists every reason."""

    def __init__(self, problems: Iterable[str], source: str = "topology") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is not a valid topology:\n{lines}")


class Settings(BaseModel):
    """Cluster-wide settings. The lab's names (`task_time`, `rebalance_interval`, `max_cpu`)
    are accepted as aliases."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False
    )

    task_time_s: float = Field(default=2.0, gt=0, le=3600, alias="task_time")
    rebalance_interval_s: float = Field(default=5.0, ge=0, le=86400, alias="rebalance_interval")
    overload_percent: float = Field(default=100.0, gt=0, le=1000, alias="max_cpu")
    wave_timeout_s: float = Field(default=5.0, gt=0, le=600)
    queue_order: QueueOrder = "longest-first"
    """How servers run their queues (see `core.ledger.QUEUE_ORDERS`)."""
    drain_grace_s: float = Field(default=30.0, ge=0, le=86400)
    """How long a server leaving the topology may go on running its tasks before they are
    stopped and queued again elsewhere from scratch (0: at once)."""
    policy: str = "lpt"
    """The balancing policy, by name (`core.policies.policy_names()`)."""

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        # Imported here: the policies module imports this one (for `Settings`).
        from treewave.core.policies import UnknownPolicy, get_policy

        try:
            get_policy(name)  # a built-in is found without scanning the installed plugins
        except UnknownPolicy as exc:
            raise ValueError(str(exc)) from None
        return name


class ServerSpec(BaseModel):
    """One server of the tree."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    # Strict: JSON `true` or `"4"` is a wrong type, not 1 or 4.
    cpus: int = Field(ge=1, le=1024, strict=True)
    tasks: int = Field(default=0, ge=0, le=100_000, strict=True)
    children: tuple[str, ...] = ()


class TopologyFile(BaseModel):
    """The raw file shape, before graph checks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    settings: Settings = Settings()
    servers: tuple[ServerSpec, ...] = Field(min_length=1)


@dataclass(frozen=True)
class ServerView:
    """What one server takes from the topology when it starts: a change to any of it needs
    the server restarted (or its container recreated) to take effect."""

    cpus: int
    parents: tuple[str, ...]
    children: tuple[str, ...]
    root: bool
    """Linked to the balancer (the root of the tree)."""
    settings: Settings

    def to_json_data(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "parents": list(self.parents),
            "children": list(self.children),
            "root": self.root,
            "settings": self.settings.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class TopologyDiff:
    """What changes from one topology to the next, as a deployment must realise it."""

    added: tuple[str, ...]
    """Servers only in the new topology, in its order."""
    removed: tuple[str, ...]
    """Servers only in the old topology, in its order: they drain, then retire."""
    changed: tuple[str, ...]
    """Servers in both whose view (`Topology.view`) differs, in the new order."""
    settings_changed: bool

    @property
    def empty(self) -> bool:
        """Nothing any server would notice (the file may still differ, e.g. in order)."""
        return not (self.added or self.removed or self.changed or self.settings_changed)


@dataclass(frozen=True)
class Topology:
    """A validated rooted DAG of servers. Build with `Topology.parse` or `load_topology`."""

    settings: Settings
    servers: tuple[ServerSpec, ...]
    root: str
    _by_name: Mapping[str, ServerSpec] = field(repr=False)
    _parents: Mapping[str, tuple[str, ...]] = field(repr=False)

    @classmethod
    def parse(cls, data: Any, source: str = "topology") -> Topology:
        """Validate the file's shape and its graph; every problem of both kinds is
        reported at once (graph checks run on whatever names and children are readable
        even when some values are not)."""
        try:
            raw = TopologyFile.model_validate(data)
        except ValidationError as exc:
            problems = _describe_validation(exc, data)
            readable = _readable_servers(data)
            if readable:
                problems += _graph_problems(readable)[0]
            raise TopologyError(problems, source) from None
        return cls._from_file(raw, source)

    @classmethod
    def from_servers(
        cls, servers: Iterable[ServerSpec], settings: Settings | None = None
    ) -> Topology:
        raw = TopologyFile(settings=settings or Settings(), servers=tuple(servers))
        return cls._from_file(raw, "topology")

    @classmethod
    def _from_file(cls, raw: TopologyFile, source: str) -> Topology:
        problems, root = _graph_problems([(s.name, s.children) for s in raw.servers])
        if problems or root is None:
            raise TopologyError(problems, source)
        by_name: dict[str, ServerSpec] = {s.name: s for s in raw.servers}
        parents: dict[str, list[str]] = {name: [] for name in by_name}
        for s in raw.servers:
            for child in s.children:
                parents[child].append(s.name)
        return cls(
            settings=raw.settings,
            servers=raw.servers,
            root=root,
            _by_name=by_name,
            _parents={k: tuple(v) for k, v in parents.items()},
        )

    # --- queries -------------------------------------------------------------------------

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.servers)

    def server(self, name: str) -> ServerSpec:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.servers)

    def children(self, name: str) -> tuple[str, ...]:
        return self._by_name[name].children

    def parents(self, name: str) -> tuple[str, ...]:
        return self._parents[name]

    @cached_property
    def edges(self) -> tuple[tuple[str, str], ...]:
        """Directed parent -> child edges, in file order."""
        return tuple((s.name, c) for s in self.servers for c in s.children)

    @cached_property
    def leaves(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.servers if not s.children)

    def echo_neighbours(self, name: str) -> tuple[str, ...]:
        """Undirected neighbours for Echo; the root is also linked to the balancer."""
        extra = (BALANCER,) if name == self.root else ()
        return extra + self.parents(name) + self.children(name)

    def finn_in(self, name: str) -> tuple[str, ...]:
        """Finn in-neighbours: the parents, or the balancer (the source) for the root."""
        return (BALANCER,) if name == self.root else self.parents(name)

    def finn_out(self, name: str) -> tuple[str, ...]:
        """Finn out-neighbours: the children, or the balancer (the sink) for a leaf."""
        return self.children(name) or (BALANCER,)

    @property
    def echo_edge_count(self) -> int:
        """Links Echo runs on: every topology edge plus the balancer's link to the root."""
        return len(self.edges) + 1

    @property
    def finn_edge_count(self) -> int:
        """Directed edges Finn runs on: topology edges, balancer -> root, leaves -> balancer."""
        return len(self.edges) + 1 + len(self.leaves)

    @cached_property
    def depth(self) -> int:
        """Longest root-to-leaf path, in edges."""
        order = _topological_order(self.root, self._by_name)
        longest = {self.root: 0}
        for name in order:
            for c in self.children(name):
                longest[c] = max(longest.get(c, 0), longest[name] + 1)
        return max(longest.values())

    @property
    def total_cpus(self) -> int:
        return sum(s.cpus for s in self.servers)

    def view(self, name: str) -> ServerView:
        """What server `name` takes from this topology at start."""
        spec = self._by_name[name]
        return ServerView(
            cpus=spec.cpus,
            parents=self.parents(name),
            children=spec.children,
            root=self.root == name,
            settings=self.settings,
        )

    def diff(self, new: Topology) -> TopologyDiff:
        """From this topology to `new`: servers added, removed, and kept with a changed
        view; whether the settings changed."""
        return TopologyDiff(
            added=tuple(n for n in new.names if n not in self),
            removed=tuple(n for n in self.names if n not in new),
            changed=tuple(n for n in new.names if n in self and self.view(n) != new.view(n)),
            settings_changed=self.settings != new.settings,
        )

    def to_json_data(self) -> dict[str, Any]:
        return TopologyFile(settings=self.settings, servers=self.servers).model_dump(mode="json")

    def dumps(self) -> str:
        """Canonical JSON text (stable key order, two-space indent, trailing newline)."""
        return json.dumps(self.to_json_data(), indent=2) + "\n"


def parse_topology_text(text: str, source: str) -> Topology:
    """Validate a topology document given as JSON text; every failure is a `TopologyError`
    naming `source` (the core reads no files: the shells hand it the text)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TopologyError(
            [f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"], source
        ) from None
    except RecursionError:
        raise TopologyError(["malformed JSON: nested too deeply"], source) from None
    return Topology.parse(data, source)


def _describe_validation(exc: ValidationError, data: Any) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = err["loc"]
        if _spurious_too_short(err):
            continue
        where = ".".join(str(x) for x in loc) or "file"
        if len(loc) >= 2 and loc[0] == "servers" and isinstance(loc[1], int):
            name = _server_name_at(data, loc[1])
            rest = ".".join(str(x) for x in loc[2:])
            where = (
                f"servers[{loc[1]}]"
                + (f" ({name!r})" if name else "")
                + (f".{rest}" if rest else "")
            )
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{where}: {msg}")
    return problems


def _spurious_too_short(err: Any) -> bool:
    """pydantic also reports a list as too short when only its *items* failed (it counts
    the valid ones); that would add a misleading "at least 1 item" to every bad server."""
    if err["type"] != "too_short":
        return False
    given, least = err.get("input"), err.get("ctx", {}).get("min_length", 0)
    return isinstance(given, (list, tuple)) and len(given) >= least


def _server_name_at(data: Any, index: int) -> str | None:
    try:
        name = data["servers"][index]["name"]
    except (KeyError, IndexError, TypeError):
        return None
    return name if isinstance(name, str) else None


ServerEdges = Sequence[tuple[str, Sequence[str]]]
"""(name, children) of each server, in file order: all the graph checks need."""


def _graph_problems(servers: ServerEdges) -> tuple[list[str], str | None]:
    """Every graph problem (names, children, roots, cycles, reachability) and the root
    when there is exactly one."""
    problems: list[str] = []
    children: dict[str, list[str]] = {}
    for i, (name, _) in enumerate(servers):
        where = f"servers[{i}] ({name!r})"
        if not DNS_LABEL.match(name):
            problems.append(
                f"{where}.name: {name!r} is not DNS-safe (lowercase letters, digits and "
                "inner hyphens, 1-63 characters)"
            )
        if name in RESERVED_NAMES:
            problems.append(f"{where}.name: {name!r} is reserved for a service")
        if name in children:
            problems.append(f"{where}.name: duplicate server name {name!r}")
        children.setdefault(name, [])
    has_parent: set[str] = set()
    for name, kids in servers:
        seen: set[str] = set()
        for child in kids:
            if child not in children:
                problems.append(f"server {name!r}.children: unknown child {child!r}")
            elif child == name:
                problems.append(f"server {name!r}.children: a server cannot be its own child")
            elif child in seen:
                problems.append(f"server {name!r}.children: child {child!r} listed twice")
            else:
                children[name].append(child)
                has_parent.add(child)
            seen.add(child)
    roots = [name for name in children if name not in has_parent]
    if not roots:
        problems.append("no root: every server is somebody's child (the graph has a cycle)")
    elif len(roots) > 1:
        problems.append(
            f"several roots ({', '.join(sorted(roots))}): exactly one server may be nobody's child"
        )
    if len(roots) == 1 and _acyclic(children):
        # One root and no cycle: every server has a parent, so following parents from any
        # of them ends at the root, which therefore reaches all (a million servers: the
        # search for a cycle and for lost servers below is only needed to name them).
        return problems, roots[0]
    cycle = _find_cycle(children)
    if cycle:
        problems.append(f"cycle: {' -> '.join(cycle)}")
    if len(roots) == 1:
        # With one root, a server it cannot reach sits in a cycle of its own.
        reached = _reachable(roots[0], children)
        lost = [name for name in children if name not in reached]
        if lost:
            problems.append(f"unreachable from the root {roots[0]!r}: {', '.join(sorted(lost))}")
    return problems, (roots[0] if len(roots) == 1 else None)


def _readable_servers(data: Any) -> list[tuple[str, list[str]]]:
    """The names and children that can be read from a file that failed validation, for
    the graph checks; [] when the servers are not there at all or an entry has no
    readable name (the graph checks would then report children as unknown wrongly)."""
    servers = data.get("servers") if isinstance(data, dict) else None
    if not isinstance(servers, list) or not servers:
        return []
    readable: list[tuple[str, list[str]]] = []
    for entry in servers:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            return []
        kids = entry.get("children", [])
        if not isinstance(kids, list):
            kids = []
        readable.append((name, [k for k in kids if isinstance(k, str)]))
    return readable


def _acyclic(children: Mapping[str, Sequence[str]]) -> bool:
    """Whether the graph has no cycle (Kahn: every server can be taken once all its
    parents were)."""
    indegree: dict[str, int] = dict.fromkeys(children, 0)
    for kids in children.values():
        for c in kids:
            indegree[c] += 1
    todo = [name for name, d in indegree.items() if d == 0]
    taken = 0
    while todo:
        taken += 1
        for c in children[todo.pop()]:
            indegree[c] -= 1
            if indegree[c] == 0:
                todo.append(c)
    return taken == len(indegree)


def _find_cycle(children: Mapping[str, Sequence[str]]) -> list[str] | None:
    """Iterative DFS; returns one cycle as a path, or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(children, white)
    for start in children:
        if colour[start] != white:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[str] = [start]
        colour[start] = grey
        while stack:
            name, i = stack[-1]
            kids = children[name]
            if i < len(kids):
                stack[-1] = (name, i + 1)
                c = kids[i]
                if colour[c] == grey:
                    return [*path[path.index(c) :], c]
                if colour[c] == white:
                    colour[c] = grey
                    stack.append((c, 0))
                    path.append(c)
            else:
                colour[name] = black
                stack.pop()
                path.pop()
    return None


def _reachable(root: str, children: Mapping[str, Sequence[str]]) -> set[str]:
    seen = {root}
    todo = deque([root])
    while todo:
        for c in children[todo.popleft()]:
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _topological_order(root: str, by_name: Mapping[str, ServerSpec]) -> list[str]:
    indegree: dict[str, int] = dict.fromkeys(by_name, 0)
    for s in by_name.values():
        for c in s.children:
            indegree[c] += 1
    order: list[str] = []
    todo = deque([root])
    while todo:
        name = todo.popleft()
        order.append(name)
        for c in by_name[name].children:
            indegree[c] -= 1
            if indegree[c] == 0:
                todo.append(c)
    return order
