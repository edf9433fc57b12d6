"""Docker Compose for the container tests and the compose benchmarks: one project's
`docker compose` command, run where its rendered files are."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

__all__ = ["run_compose"]


def run_compose(
    project: str,
    directory: Path,
    env: Mapping[str, str],
    *args: str,
    timeout: float | None = 120,
) -> subprocess.CompletedProcess[str]:
    """`docker compose -p PROJECT -f DIRECTORY/compose.yml ARGS` in `directory` with `env`,
    its output captured as text. A failure is an answer (the caller checks `returncode`);
    only running past `timeout` seconds raises."""
    return subprocess.run(
        ["docker", "compose", "-p", project, "-f", str(directory / "compose.yml"), *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
