"""The one error a local run ends with: reported by the console script as one clear line."""

__all__ = ["LocalRunError"]


class LocalRunError(Exception):
    """The local cluster cannot be started or kept running (ports, a child that keeps
    dying at start, not ready in time); the message says which and why."""
