"""Reading a topology file: the I/O half of loading a topology (the core validates)."""

from __future__ import annotations

from pathlib import Path

from treewave.core.topology import Topology, TopologyError, parse_topology_text

__all__ = ["load_topology"]


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; every failure is a `TopologyError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError([f"cannot read the file: {exc.strerror or exc}"], str(p)) from None
    except UnicodeDecodeError as exc:
        raise TopologyError([f"not UTF-8 text: {exc.reason} at byte {exc.start}"], str(p)) from None
    return parse_topology_text(text, str(p))
