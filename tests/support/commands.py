"""How to run `treewave` the way users do, in a clean environment."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

__all__ = ["REPO", "clean_env", "treewave_command"]

REPO = Path(__file__).resolve().parents[2]


def treewave_command() -> list[str]:
    """The installed console script (what users run), else an equivalent."""
    script = Path(sys.executable).parent / "treewave"
    if script.is_file():
        return [sys.executable, str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from treewave.cli.main import main; sys.exit(main())",
    ]


def sigint_as_in_a_terminal() -> None:
    """`preexec_fn` for a child that a test stops with SIGINT, as Ctrl-C would: it starts
    with SIGINT's default disposition. Under a runner started as a background job SIGINT
    is inherited as ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any TREEWAVE_* variable (a developer's settings must not
    leak into a test), unbuffered output, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREEWAVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
