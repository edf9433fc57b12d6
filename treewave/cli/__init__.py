"""The `treewave` console script: one module per group of subcommands, settings in one place."""

__all__ = [
    "api_client",
    "apply_cmd",
    "argtypes",
    "client_cmd",
    "deploy_cmd",
    "errors",
    "experiment_cmd",
    "main",
    "run_cmd",
    "secret_cmd",
    "services_cmd",
    "settings",
    "simulate_cmd",
    "trace_cmd",
]
