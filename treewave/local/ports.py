"""Loopback ports for a local cluster: the probe and the allocation of a block of them."""

from __future__ import annotations

import random
import socket

from treewave.local.errors import LocalRunError

__all__ = ["HOST", "allocate_ports", "free_port", "free_port_block", "port_free"]

HOST = "127.0.0.1"


def port_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on `host:port`. SO_REUSEADDR, as the services use, so a
    port whose old connections linger in TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def allocate_ports(base: int, count: int, exclude: set[int]) -> list[int]:
    """`count` free ports from `base` upwards (consecutive unless some are taken)."""
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if port > 65535:
            raise LocalRunError(f"not enough free ports from {base} for {count} servers")
        if port not in exclude and port_free(port):
            ports.append(port)
        port += 1
    return ports


def free_port(host: str = HOST) -> int:
    """A port the kernel calls free now (it can still be taken before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_block(size: int, first: int = 20000, last: int = 30000) -> int:
    """The first of `size` consecutive free ports, below the kernel's ephemeral range
    (32768 up on Linux, where an outgoing connection could take one between this probe
    and the bind), for `treewave run --base-port`. Drawn at random, so two blocks chosen
    one after the other do not start at the same port."""
    for _ in range(200):
        base = random.randint(first, last - size)
        if all(port_free(p) for p in range(base, base + size)):
            return base
    raise LocalRunError(f"no {size} consecutive free ports between {first} and {last}")
