"""The sans-IO core, no I/O at all: topology, messages, Echo and Finn, transfers, policy, ledger,
the API's types."""

__all__ = [
    "api",
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
    "policy",
    "randomtree",
    "simulation",
    "topology",
    "trace",
    "transfer",
    "transfersim",
]
