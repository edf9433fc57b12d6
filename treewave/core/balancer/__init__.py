"""The balancer's sans-IO machine (`machine`) and the effects it returns (`effects`)."""

from treewave.core.balancer.machine import (
    LINK_WAIT_S,
    RETRY_S,
    BalancerMachine,
    CommandRefused,
    RoundPhase,
    hop_budget_s,
)

__all__ = [
    "LINK_WAIT_S",
    "RETRY_S",
    "BalancerMachine",
    "CommandRefused",
    "RoundPhase",
    "hop_budget_s",
]
