"""The balancer role: waves, policy and rebalancing, its HTTP API (and its OpenAPI document),
status page and metrics."""

__all__ = [
    "access",
    "app",
    "cluster",
    "dialing",
    "errors",
    "metrics",
    "openapi",
    "settings",
    "statefile",
    "status",
    "traces",
]
