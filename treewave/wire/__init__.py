"""I/O pieces shared by the shells: the WebSocket link layer of the node and the balancer
(dial with backoff, introduce yourself, one reader per socket, send by peer name), their
files, and the client of the balancer's topology API that deployments drive changes
through. No protocol logic here."""

__all__ = [
    "addressing",
    "atomicfile",
    "auth",
    "http",
    "links",
    "secretfile",
    "timers",
    "topology_api",
    "topology_change",
    "topology_file",
]
