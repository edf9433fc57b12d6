"""The errors a command raises to end with one clear report instead of a traceback."""

__all__ = ["CommandError", "ConfigError"]


class CommandError(Exception):
    """A failure to report as one clear line (exit code 1)."""


class ConfigError(Exception):
    """A bad setting or configuration file, named with its source (exit code 2, like a
    usage error): nothing was started or changed."""
