"""Free loopback ports (a port chosen here can still be taken before it is bound: the
launchers retry with new ports). `port_free` is the very probe `treewave run` uses."""

from __future__ import annotations

import random
import socket

from treewave.local.ports import port_free

__all__ = ["HOST", "free_port", "free_port_block", "free_ports", "port_free"]

HOST = "127.0.0.1"


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


def free_port() -> int:
    return free_ports(1)[0]


def free_port_block(size: int, first: int = 20000, last: int = 30000) -> int:
    """The first of `size` consecutive free ports, outside the ephemeral range (for
    `treewave run --base-port`, which takes consecutive ports and skips taken ones). Drawn
    at random, so two blocks chosen one after the other do not start at the same port."""
    for _ in range(200):
        base = random.randint(first, last - size)
        if all(port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports between {first} and {last}")
