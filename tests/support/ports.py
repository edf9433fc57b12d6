"""Free loopback ports (a port chosen here can still be taken before it is bound: the
launchers retry with new ports). `port_free` is the very probe `treewave run` uses."""

from __future__ import annotations

import socket

from treewave.local.ports import HOST, free_port, free_port_block, port_free

__all__ = ["HOST", "free_port", "free_port_block", "free_ports", "port_free"]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (all held open together while choosing them)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
