"""Balancing policies by name: the seam through which the balancer, `treewave experiment`
and the benchmarks choose a method.

A policy is a pure value: an Echo snapshot (as `Load`s) and the topology's settings in,
moves of queued tasks out. It never sees sockets or clocks, so the balancer machine, the
discrete-event model and the unit tests run the very same code. Built-in policies are
registered here; third-party ones through the `treewave.policies` entry point group (each
entry point names a `Policy` object or a zero-argument callable returning one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from treewave.core.policies_builtin import CountPolicy, LabPolicy, StealPolicy
from treewave.core.policy import Load, Move, plan_moves
from treewave.core.topology import Settings

__all__ = [
    "DEFAULT_POLICY",
    "ENTRY_POINT_GROUP",
    "LptPolicy",
    "Policy",
    "UnknownPolicy",
    "get_policy",
    "policy_names",
    "register",
]

ENTRY_POINT_GROUP = "treewave.policies"
DEFAULT_POLICY = "lpt"


@runtime_checkable
class Policy(Protocol):
    """Decides which queued tasks move where, from one snapshot of every server."""

    @property
    def name(self) -> str:
        """The name it is chosen by (`settings.policy`, `--policy`)."""
        ...

    @property
    def description(self) -> str:
        """One line for `--help`, the status page and reports."""
        ...

    def plan(self, loads: Sequence[Load], settings: Settings) -> list[Move]:
        """Moves of queued tasks only (running ones never move), naming known servers."""
        ...


@dataclass(frozen=True)
class LptPolicy:
    """Expected-work LPT with local search (`core.policy.plan_moves`)."""

    name: str = "lpt"
    description: str = "expected-work LPT with local search (minimises the expected makespan)"

    def plan(self, loads: Sequence[Load], settings: Settings) -> list[Move]:
        return plan_moves(loads)


class UnknownPolicy(ValueError):
    """A policy name nobody registered; the message lists the known ones."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown policy {name!r} (known: {', '.join(known)})")
        self.name = name
        self.known = tuple(known)


_BUILTIN: dict[str, Policy] = {}


def register(policy: Policy) -> Policy:
    """Make `policy` choosable by its name (built-ins call this at import)."""
    _BUILTIN[policy.name] = policy
    return policy


register(LptPolicy())
register(CountPolicy())
register(LabPolicy())
register(StealPolicy())


def _plugins() -> dict[str, Policy]:
    found: dict[str, Policy] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        # A class also "has" name, description and plan: instantiate it, like a factory.
        policy = obj() if isinstance(obj, type) or not isinstance(obj, Policy) else obj
        if not isinstance(policy, Policy):
            raise TypeError(
                f"entry point {ep.name!r} ({ep.value}) is not a treewave policy "
                "(needs name, description and plan(loads, settings))"
            )
        found[ep.name] = policy
    return found


def policy_names() -> list[str]:
    """Every policy that can be chosen: the built-ins, then installed plugins."""
    return [*_BUILTIN, *(n for n in sorted(_plugins()) if n not in _BUILTIN)]


def get_policy(name: str) -> Policy:
    """The policy called `name`; `UnknownPolicy` (listing the known ones) otherwise."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    plugins = _plugins()
    if name in plugins:
        return plugins[name]
    raise UnknownPolicy(name, policy_names())
