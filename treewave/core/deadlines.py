"""How long a wave may take: the configured deadline, grown with the tree.

A wave's deadline (`wave_timeout_s`) is what lets a dead server make the wave *partial*
instead of hanging it. A fixed deadline also cuts off a healthy wave that is merely long:
Echo and Finn cost a message round per hop of depth and CPU per server, and on a busy
host (300 containers on 2 cores) a large tree can need more than the setting. So the
deadline every wave gets is

    max(wave_timeout_s, BASE_S + PER_HOP_S * depth + PER_SERVER_S * servers)

capped at `MAX_WAVE_DEADLINE_S` (a configured deadline above the cap is kept): the setting
is a floor, and a tree only gets more time than it when it is deep or large. The
allowances are generous on purpose (measured on a 2-core machine: one hop about 0.15 ms of
round trip, a server about 0.5 ms of CPU per wave, bench/README.md): a deadline exists to
detect a dead server, and a too-short one reports healthy servers as missing.
"""

from __future__ import annotations

__all__ = [
    "BASE_S",
    "MAX_WAVE_DEADLINE_S",
    "PER_HOP_S",
    "PER_SERVER_S",
    "wave_deadline_s",
]

BASE_S = 1.0
"""Fixed part: starting the wave and the balancer's side of it."""
PER_HOP_S = 0.05
"""Per hop of the topology's depth (the root is depth 0): messages go down and back up."""
PER_SERVER_S = 0.01
"""Per server: each one handles its messages on a CPU shared with the others."""
MAX_WAVE_DEADLINE_S = 600.0
"""The largest deadline the rule gives (the largest `wave_timeout_s` allowed)."""


def wave_deadline_s(wave_timeout_s: float, depth: int, servers: int) -> float:
    """The deadline of a wave over a tree of this depth and number of servers."""
    if not wave_timeout_s > 0:
        raise ValueError(f"wave_timeout_s must be > 0, got {wave_timeout_s!r}")
    if depth < 0 or servers < 1:
        raise ValueError(f"a tree has depth >= 0 and servers >= 1, got {depth}, {servers}")
    grown = min(BASE_S + PER_HOP_S * depth + PER_SERVER_S * servers, MAX_WAVE_DEADLINE_S)
    return max(wave_timeout_s, grown)
