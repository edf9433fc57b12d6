"""What the balancer answers when it cannot carry out a request; the HTTP layer
(`treewave.balancer.app`) maps each to a status code."""

from __future__ import annotations

__all__ = [
    "BalancerError",
    "BalancerStateError",
    "ServerNotConnected",
    "ServerRetiring",
    "SubmitUnconfirmed",
    "UnknownServer",
]


class BalancerError(Exception):
    """A request the balancer could not carry out; nothing changed unless said."""


class UnknownServer(BalancerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown server {name!r}")
        self.name = name


class ServerRetiring(BalancerError):
    """The server is leaving the topology: it takes no new work."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"server {name!r} is retiring (not in the current topology); it takes no new "
            "tasks, nothing was queued"
        )
        self.name = name


class BalancerStateError(BalancerError, ValueError):
    """The saved topology and migration cannot be read: starting without them could strand
    the tasks of servers still draining, so the balancer does not start."""


class ServerNotConnected(BalancerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"server {name!r} is not connected; nothing was queued")
        self.name = name


class SubmitUnconfirmed(BalancerError):
    """The server did not confirm a submission in time: the tasks may or may not be queued."""

    def __init__(self, name: str, first_task: str, last_task: str) -> None:
        super().__init__(
            f"server {name!r} did not confirm the tasks; they may or may not be queued there"
        )
        self.name = name
        self.first_task = first_task
        self.last_task = last_task
