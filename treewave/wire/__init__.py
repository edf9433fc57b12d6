"""The WebSocket link layer shared by the node and balancer shells: dial with backoff,
introduce yourself, one reader per socket, send by peer name. No protocol logic here."""

__all__ = [
    "addressing",
    "atomicfile",
    "auth",
    "http",
    "links",
    "secretfile",
    "timers",
    "topology_file",
]
