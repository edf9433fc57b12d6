"""The node role: one server as an aiohttp app (its queue, CPU slots, links and metrics)
and its task store."""

__all__ = ["app", "metrics", "settings", "store"]
