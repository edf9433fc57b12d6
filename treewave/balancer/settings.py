"""How the balancer is configured (`treewave balancer` fills it from flags and TREEWAVE_*
variables: see treewave.cli.settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from treewave.balancer.access import AccessSettings
from treewave.core.precedence import SettingOverrides
from treewave.wire.links import DEFAULT_PEER_TEMPLATE

__all__ = ["DEFAULT_PORT", "BalancerSettings"]

DEFAULT_PORT = 7999


@dataclass(frozen=True)
class BalancerSettings:
    topology: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    peer_url_template: str = DEFAULT_PEER_TEMPLATE
    peer_urls: dict[str, str] = field(default_factory=dict)
    secret: str = ""
    rebalance_interval_s: float | None = None
    """Overrides the topology's setting; 0 turns periodic rebalancing off."""
    wave_timeout_s: float | None = None
    """Overrides the topology's setting: the deadline of every wave."""
    policy: str | None = None
    """Overrides the topology's setting: the balancing policy, by name."""
    step_timeout_s: float = 2.0
    """How long one transfer step waits for its answer."""
    status_interval_s: float = 2.0
    """How often the status page gets a fresh snapshot (at least 1 s)."""
    trace_history: int = 50
    """How many traced waves the balancer keeps (bounded memory); 0 turns tracing off."""
    trace_sample: float = 0.1
    """The share of periodic rebalancing waves that are traced (API waves always are)."""
    state_dir: Path | None = None
    """Where the desired topology and the migration are kept across restarts (file
    `balancer-topology.json`); None: in memory only."""
    peers_file: Path | None = None
    """The peers file `peer_urls` came from: read again when a topology is posted (local
    mode writes the added servers' URLs into it before posting)."""
    probe_interval_s: float = 1.0
    """How often a retiring server is asked what it still holds."""
    access: AccessSettings = field(default_factory=AccessSettings)
    """Host, Origin, Content-Type and API-token rules of the HTTP API (balancer/access.py)."""

    def overrides(self) -> SettingOverrides:
        """The flags and environment values that override the topology file's settings."""
        return SettingOverrides(
            rebalance_interval_s=self.rebalance_interval_s,
            wave_timeout_s=self.wave_timeout_s,
            policy=self.policy,
        )
