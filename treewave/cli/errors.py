"""The error every command raises for a failure to report as one line (exit code 1)."""

__all__ = ["CommandError"]


class CommandError(Exception):
    """A failure to report as one clear line (exit code 1)."""
