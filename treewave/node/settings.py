"""How one server process is configured (`treewave node` fills it from flags and
TREEWAVE_* variables: see treewave.cli.settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from treewave.wire.links import DEFAULT_PEER_TEMPLATE

__all__ = ["NodeSettings"]


@dataclass(frozen=True)
class NodeSettings:
    name: str
    topology: Path
    host: str = "127.0.0.1"
    port: int = 8000
    peer_url_template: str = DEFAULT_PEER_TEMPLATE
    peer_urls: dict[str, str] = field(default_factory=dict)
    """Explicit URLs by server name (local runs), overriding the template."""
    state_dir: Path | None = None
    """Where the queue is persisted so it survives a crash; None keeps it in memory."""
    secret: str = ""
    """Per-deployment secret that authenticates links; empty disables the check."""
    crash_points: frozenset[str] = frozenset()
    """Fault injection for tests: `before:TYPE` / `after:TYPE` makes the process exit
    hard just before handling / just after handling (and persisting) a message of that
    type, before any reply is sent. Set with TREEWAVE_CRASH (comma-separated)."""
    flood_rate: float = 2000.0
    """Frames per second a link may send on average (bursts of twice that) before its
    frames are dropped and counted."""
    trace_waves: int = 64
    """How many recent waves this server keeps its part of the trace for (bounded
    memory; 0 records nothing). Each part is pushed to the balancer when the server is
    done with the wave."""
    trace_push_s: float = 1.0
    """The push window: the parts of the waves this server finished within it go to the
    balancer together, in one frame (0: each part at once, in its own frame). Keep it well
    under the balancer's step timeout (2 s), after which the balancer asks instead."""
