"""The balancer role: waves, policy and rebalancing, its HTTP API (and its OpenAPI document),
status page and metrics."""

__all__ = ["access", "app", "cluster", "metrics", "openapi", "settings", "status", "traces"]
