"""Protocol errors, split as in h11: who broke the rules decides how to react."""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError", "StaleMessage"]


class ProtocolError(Exception):
    """Base class; `reason` is a short machine-friendly tag used as a metric label."""

    def __init__(self, message: str, reason: str = "protocol") -> None:
        super().__init__(message)
        self.reason = reason


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid or unexpected; our state is unchanged."""


class StaleMessage(RemoteProtocolError):
    """A message for a wave this node already finished: late, not hostile."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="stale_wave")


class LocalProtocolError(ProtocolError):
    """We misused the API (a bug in the shell calling the core)."""
