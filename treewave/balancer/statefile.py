"""The balancer's files: its state file (the desired topology and a migration in
progress, kept across restarts: written atomically and synced, read back strictly), and
the peers file read again on a topology change."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from treewave.balancer.errors import BalancerStateError
from treewave.core.errors import LocalProtocolError
from treewave.core.migration import Migration
from treewave.core.topology import Topology
from treewave.wire.atomicfile import write_atomic

__all__ = ["STATE_FILE", "reread_peers", "restore_migration", "save_migration"]

log = logging.getLogger("treewave.balancer")

STATE_FILE = "balancer-topology.json"
"""The desired topology and the migration, in the balancer's state directory."""


def restore_migration(path: Path | None, topology: Topology, probe_interval_s: float) -> Migration:
    """The saved migration, or a fresh one on `topology`; a file that cannot be used is a
    `BalancerStateError` (starting without it could strand the tasks of draining servers)."""
    if path is None or not path.exists():
        return Migration(topology, probe_interval_s)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return Migration.from_json_data(saved)
    except (OSError, UnicodeDecodeError, ValueError, LocalProtocolError) as exc:
        raise BalancerStateError(
            f"cannot use the saved topology {path}: {exc} (move it away to "
            "start afresh; servers still draining would then keep their tasks)"
        ) from None


def save_migration(path: Path | None, migration: Migration) -> None:
    """Write the desired topology and the migration atomically (when `path` is set)."""
    if path is None:
        return
    data = json.dumps(migration.to_json_data(), separators=(",", ":"))
    try:
        write_atomic(path, data)
    except OSError as exc:
        log.error("cannot save the topology state to %s: %s", path, exc)


def reread_peers(path: Path, current: dict[str, str]) -> dict[str, str]:
    """The peers file again (local mode writes the added servers' URLs into it before
    posting a topology); `current` when it cannot be read or is not a name -> URL map."""
    try:
        peers = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("cannot read the peers file %s again (%s); keeping the old one", path, exc)
        return current
    if isinstance(peers, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in peers.items()
    ):
        return peers
    log.warning("the peers file %s does not map names to URLs; keeping the old one", path)
    return current
