"""The balancer role: waves, policy and rebalancing, its HTTP API, status page and metrics."""

__all__ = [
    "access",
    "app",
    "cluster",
    "dialing",
    "errors",
    "metrics",
    "settings",
    "statefile",
    "status",
    "traces",
]
