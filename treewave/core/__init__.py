"""The sans-IO core, no I/O at all: topology, messages, Echo and Finn, transfers, policy, ledger."""

__all__ = [
    "deadlines",
    "echo",
    "errors",
    "events",
    "finn",
    "ledger",
    "load",
    "messages",
    "migration",
    "node",
    "policies",
    "policies_builtin",
    "policy",
    "randomtree",
    "simulation",
    "topology",
    "trace",
    "transfer",
    "transfersim",
]
