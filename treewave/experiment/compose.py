"""The `compose` runner: each run on its own Docker Compose stack, rendered by treewave's
own generator from the spec's topology, the policy in its `settings.policy`.

A stack is the deployment a user gets from `treewave render` + `docker compose up`: the
same `compose.yml`, the same image (built as that file says, once per experiment, tagged
`TREEWAVE_IMAGE`, by default `treewave:experiment` so an experiment neither runs nor
overwrites a user's `treewave:local`). Two things are added, both outside that file:

- an override file (`experiment-ports.yml`) that publishes every server's HTTP port on a
  free loopback port chosen by Docker: the servers sit on an internal network, and the
  runner polls each one's `/api/state` every 20 ms like the `local` runner does (the
  balancer's per-server figures are only as fresh as its last Echo wave, and reading
  them would start more waves than the policy asks for);
- only the servers and the balancer are started (their link secret comes with them):
  Prometheus and Grafana add nothing the runner measures.

The balancer's port is a free one; each stack has a project name of its own
(`treewave-experiment-<policy>-s<seed>-<random>`), and it is always taken down with
`docker compose down -v` (also on an error or Ctrl-C, which waits for it), so no
container, network or volume is left. The workload and the measurements are
`drive.run_workload`, the same as the `local` runner's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

from treewave.core.topology import Topology
from treewave.experiment.drive import Cluster, RunError, wait_until_linked
from treewave.generator.render import (
    COMPOSE_FILE,
    REPO_ROOT,
    TemplateNotFoundError,
    find_compose_template,
    render,
)
from treewave.local.ports import free_port

__all__ = [
    "ComposeCluster",
    "ComposeRunError",
    "build_image",
    "compose_cluster",
    "compose_problem",
    "project_name",
    "published_ports",
]

HOST = "127.0.0.1"
DEFAULT_IMAGE = "treewave:experiment"
PORTS_FILE = Path("experiment-ports.yml")
NODE_PORT = 8000
BALANCER_PORT = 7999
BUILD_TIMEOUT_S = 900.0
UP_TIMEOUT_S = 600.0
DOWN_TIMEOUT_S = 300.0
PROBE_TIMEOUT_S = 30.0
LINK_TIMEOUT_S = 120.0

Progress = Callable[[str], None]


class ComposeRunError(RunError):
    """A stack did not build, come up or go down."""


def compose_problem() -> str | None:
    """What the `compose` runner lacks here (one line), or None: the docker CLI, its
    Compose v2 plugin, a reachable engine, and a source tree to build the image from."""
    if shutil.which("docker") is None:
        return "the compose runner needs Docker: no `docker` command on PATH"
    checks: tuple[tuple[str, str, list[str]], ...] = (
        ("docker compose version", "the Docker Compose v2 plugin", []),
        ("docker info", "a running Docker engine", ["--format", "{{.ServerVersion}}"]),
    )
    for command, what, options in checks:
        try:
            probe = subprocess.run(
                [*command.split(), *options],
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"the compose runner needs {what}: `{command}` failed: {exc}"
        if probe.returncode != 0:
            why = _first_line(probe.stderr) or _first_line(probe.stdout) or "no output"
            return f"the compose runner needs {what}: `{command}` failed: {why}"
    try:
        find_compose_template(REPO_ROOT / "topology.json")
    except TemplateNotFoundError as exc:
        return f"the compose runner needs treewave's source tree: {exc}"
    if not (REPO_ROOT / "docker" / "Dockerfile").is_file():
        return (
            f"the compose runner needs treewave's source tree: no docker/Dockerfile in {REPO_ROOT}"
        )
    return None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def project_name(policy: str, seed: int) -> str:
    """A Compose project name of its own for one run (lower case, digits, dashes)."""
    label = re.sub(r"[^a-z0-9]+", "-", policy.lower()).strip("-")[:20] or "policy"
    return f"treewave-experiment-{label}-s{seed}-{secrets.token_hex(3)}"


def _environment(image: str | None, balancer_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env["TREEWAVE_IMAGE"] = image or os.environ.get("TREEWAVE_IMAGE") or DEFAULT_IMAGE
    env["TREEWAVE_BIND_ADDRESS"] = HOST
    env["TREEWAVE_BALANCER_PORT"] = str(balancer_port)
    env.pop("TREEWAVE_TOKEN_FOR_READS", None)  # the runner reads the API without the token
    return env


@dataclass(kw_only=True)
class ComposeCluster(Cluster):
    """A running stack: the URLs, and the project, directory and environment that
    `docker compose` needs to talk about it."""

    runner: ClassVar[str] = "compose"
    project: str
    directory: Path
    env: dict[str, str]

    def compose(
        self, *args: str, timeout: float | None = 120.0, new_session: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return _compose(
            self.project, self.directory, self.env, *args, timeout=timeout, new_session=new_session
        )


def _compose(
    project: str,
    directory: Path,
    env: Mapping[str, str],
    *args: str,
    timeout: float | None,
    new_session: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`docker compose` on the rendered file and the ports override, output captured."""
    files = ["-f", str(directory / COMPOSE_FILE), "-f", str(directory / PORTS_FILE)]
    try:
        return subprocess.run(
            ["docker", "compose", "-p", project, *files, *args],
            cwd=directory,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=new_session,
        )
    except subprocess.TimeoutExpired:
        raise ComposeRunError(
            f"`docker compose {args[0]}` of {project} did not finish in {timeout:g} s"
        ) from None


def render_stack(topology: Topology, directory: Path) -> None:
    """The user's deployment files for `topology` in `directory`, plus the override that
    publishes each server's port on a loopback port Docker picks."""
    (directory / "topology.json").write_text(topology.dumps(), encoding="utf-8")
    render(topology, "topology.json", directory)
    ports = {
        name: {"networks": ["published"], "ports": [f"{HOST}::{NODE_PORT}"]}
        for name in topology.names
    }
    text = "# Written by `treewave experiment` (compose runner): every server's HTTP port\n"
    text += "# published on loopback so the runner can poll its /api/state.\n"
    text += json.dumps({"services": ports}, indent=2) + "\n"
    (directory / PORTS_FILE).write_text(text, encoding="utf-8")


def build_image(topology: Topology, image: str | None = None) -> str:
    """Build the image as the rendered compose file says (`docker compose build`);
    returns its tag."""
    with tempfile.TemporaryDirectory(prefix="treewave-experiment-build-") as tmp:
        directory = Path(tmp)
        render_stack(topology, directory)
        env = _environment(image, BALANCER_PORT)
        project = f"treewave-experiment-build-{secrets.token_hex(3)}"
        done = _compose(project, directory, env, "build", "balancer", timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
            raise ComposeRunError(f"building the image {env['TREEWAVE_IMAGE']} failed:\n{tail}")
        return env["TREEWAVE_IMAGE"]


def published_ports(ps: str) -> dict[str, int]:
    """Service -> published host port of its HTTP port, from `docker compose ps --format
    json` (one object per line, or one array on older Compose)."""
    text = ps.strip()
    rows: list[dict[str, Any]] = (
        json.loads(text)
        if text.startswith("[")
        else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    found: dict[str, int] = {}
    for row in rows:
        for pub in row.get("Publishers") or []:
            if pub.get("TargetPort") in (NODE_PORT, BALANCER_PORT) and pub.get("PublishedPort"):
                found[row["Service"]] = int(pub["PublishedPort"])
    return found


@contextlib.contextmanager
def _shielded_from_ctrl_c() -> Iterator[None]:
    """Ctrl-C (and SIGTERM) wait while a stack is taken down: a stack must not be left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the run as Ctrl-C does, so the stack is still taken down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _take_down(c: ComposeCluster, log: Path | None, progress: Progress) -> str | None:
    """Save the services' logs (if asked) and `down -v`; what went wrong, or None. Never
    raises: it runs while another error may be on its way out."""
    with _shielded_from_ctrl_c():
        progress(f"taking {c.project} down (docker compose down -v)")
        if log is not None:
            try:
                logs = c.compose(
                    "logs", "--no-color", "--timestamps", timeout=120, new_session=True
                )
                log.write_text(logs.stdout + logs.stderr, encoding="utf-8")
            except (ComposeRunError, OSError) as exc:
                progress(f"{c.project}: its logs could not be saved: {exc}")
        try:
            down = c.compose(
                "down", "-v", "--remove-orphans", "--timeout", "10",
                timeout=DOWN_TIMEOUT_S, new_session=True,
            )  # fmt: skip
        except (ComposeRunError, OSError) as exc:
            return f"{exc}: remove it with `docker compose -p {c.project} down -v`"
        if down.returncode != 0:
            return f"`docker compose down -v` of {c.project} failed: {_first_line(down.stderr)}"
    return None


@contextlib.contextmanager
def compose_cluster(
    topology: Topology,
    project: str,
    image: str,
    log: Path | None = None,
    progress: Progress = lambda _: None,
) -> Iterator[ComposeCluster]:
    """Render `topology` into a fresh directory, bring its servers and balancer up as
    project `project` (the image `image` already built), wait until the balancer is
    linked to every server, and yield the stack; always take it down."""
    with tempfile.TemporaryDirectory(prefix="treewave-experiment-") as tmp, _sigterm_interrupts():
        directory = Path(tmp)
        render_stack(topology, directory)
        port = free_port()
        cluster = ComposeCluster(
            topology,
            f"http://{HOST}:{port}",
            {},
            project=project,
            directory=directory,
            env=_environment(image, port),
        )
        services = [*topology.names, "balancer"]
        try:
            started = time.monotonic()
            progress(f"bringing {project} up ({len(topology)} servers and the balancer)")
            up = cluster.compose(
                "up", "-d", "--wait", "--no-build", *services, timeout=UP_TIMEOUT_S
            )
            if up.returncode != 0:
                tail = "\n".join((up.stdout + up.stderr).strip().splitlines()[-20:])
                raise ComposeRunError(f"`docker compose up` of {project} failed:\n{tail}")
            ps = cluster.compose("ps", "--format", "json", *services)
            ports = published_ports(ps.stdout)
            missing = sorted(set(services) - set(ports))
            if ps.returncode != 0 or missing:
                raise ComposeRunError(
                    f"{project}: no published port for {', '.join(missing) or 'any service'}"
                    f" {_first_line(ps.stderr)}".rstrip()
                )
            if ports["balancer"] != port:
                raise ComposeRunError(
                    f"{project}: the balancer is on {ports['balancer']}, not {port}"
                )
            cluster.node_urls = {n: f"http://{HOST}:{ports[n]}" for n in topology.names}
            wait_until_linked(cluster, LINK_TIMEOUT_S)
            progress(f"{project} up and linked in {time.monotonic() - started:.1f} s")
            yield cluster
        except BaseException:
            problem = _take_down(cluster, log, progress)
            if problem:
                progress(problem)
            raise
        problem = _take_down(cluster, log, progress)
        if problem:
            raise ComposeRunError(problem)
