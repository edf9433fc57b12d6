"""`treewave run`: the whole cluster as local processes on 127.0.0.1, supervised.

Every server and the balancer run as child processes (`python -m treewave.cli.main node --name
NAME ...`, so `ps` tells them apart by name). The supervisor:

- picks ports (the balancer on `--port`, the servers on consecutive ports from
  `--base-port`, skipping any that are taken), writes the peers file (server name ->
  WebSocket URL) into a temporary run directory, and sends each child's output to a log
  file there;
- waits until every server answers `/healthz`, the balancer is linked to all of them and
  an Echo wave comes back complete, then prints the URLs;
- restarts a child that dies unexpectedly, with exponential backoff; the servers keep
  their queues in a state directory (`--state-dir`, or one inside the run directory) so a
  restarted server gets its queue back;
- on SIGINT or SIGTERM sends SIGTERM to every child, SIGKILL after a grace period,
  reaps them all (no zombie) and removes the run directory. A second Ctrl-C skips the grace
  period;
- on SIGHUP reloads the topology file (see `Supervisor.reload`): an invalid file is
  reported and changes nothing; otherwise added servers start, kept servers whose view
  (cpus, parents, children, root, settings) changed restart on the same port with their
  queue, the balancer gets the new topology (`POST /api/topology`), and each removed server
  runs on until the balancer reports it retired (drained, holding nothing): only then is it
  stopped and its state file deleted. Every child runs from a snapshot of the topology it
  belongs to (`topology-N.json` in the run directory), so a crash restarts it as it was.

How nothing outlives it:

- Each child runs in its own process group, so a Ctrl-C at the terminal reaches only the
  supervisor, which then stops the children itself; signals go to the whole group.
- On Linux each child asks the kernel (`prctl(PR_SET_PDEATHSIG, SIGKILL)`, from a
  `preexec_fn`) to be killed when its parent goes, so even a SIGKILLed supervisor leaves no
  server behind (only its run directory, which the next `treewave run` removes). Two
  caveats shape the code: the death signal fires when the *thread* that forked the child
  exits, and `preexec_fn` is unsafe when other threads exist. The supervisor therefore has
  exactly one thread and forks every child from it (no executor, no asyncio child
  watcher). `prctl` is looked up before forking, and the child checks that its parent did
  not die before the `prctl` took effect.
  The servers persist their queues as they change, so SIGKILL loses nothing queued.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TextIO

from treewave.cli import argtypes
from treewave.cli.argtypes import non_negative_float, positive_float
from treewave.cli.errors import CommandError, ConfigError
from treewave.cli.settings import (
    LOG_LEVEL,
    REBALANCE_INTERVAL,
    STATUS_INTERVAL,
    TOKEN_FOR_READS,
    TOPOLOGY,
    WAVE_TIMEOUT,
    add_options,
)
from treewave.cli.topology_api import (
    TopologyApiError,
    TopologyRejected,
    get_topology,
    post_topology,
)
from treewave.core.deadlines import wave_deadline_s
from treewave.core.topology import Topology, TopologyError
from treewave.wire.atomicfile import write_atomic
from treewave.wire.secretfile import ensure_secret, read_secret
from treewave.wire.topology_file import load_topology

__all__ = [
    "PID_FILE",
    "RUN_DIR_PREFIX",
    "TOPOLOGY_PATH_FILE",
    "Supervisor",
    "port_free",
    "register",
]

HOST = "127.0.0.1"
DEFAULT_PORT = 7999
DEFAULT_BASE_PORT = 8000
PR_SET_PDEATHSIG = 1
LOOP_S = 0.1
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_S = 10.0
"""A child that ran at least this long before dying restarts after the shortest backoff."""
RUN_DIR_PREFIX = "treewave-run-"
PID_FILE = "supervisor.pid"
TOPOLOGY_PATH_FILE = "topology-path"
"""Holds the topology file a run reloads on SIGHUP (how `treewave apply --local` finds it)."""
POST_ATTEMPTS_S = 30.0
"""How long a reload keeps trying to reach the balancer before undoing its changes."""
POLL_TOPOLOGY_S = 1.0
START_ATTEMPTS = 3
"""While starting, a child that dies this many times in a row (each within `STABLE_S`)
makes `treewave run` give up instead of retrying forever."""

EXAMPLE = """\
examples:
  treewave run                                   # topology.json, balancer on :7999
  treewave run --topology big.json --port 9000 --base-port 9100
  treewave run --state-dir run-state --rebalance-interval 0   # keep queues, no auto-balance

Stop with Ctrl-C (or SIGTERM): every server and the balancer stop with it.
Change the topology live: edit the file, then `kill -HUP PID` (the pid is printed at start)
or `treewave apply --local --topology FILE`.
"""

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Loopback only: never through an HTTP proxy from the environment."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the whole cluster as local processes (no Docker)",
        description=textwrap.fill(
            "Start every server of the topology and the balancer as local processes "
            "on 127.0.0.1, wait until they are healthy, print the URLs and supervise them: a "
            "child that dies is restarted; Ctrl-C or SIGTERM stops them all.",
            88,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    add_options(p, TOPOLOGY)
    p.add_argument(
        "--port",
        type=argtypes.port,
        default=DEFAULT_PORT,
        metavar="PORT",
        help=f"balancer port: API, status page, metrics (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "--base-port",
        type=argtypes.port,
        default=DEFAULT_BASE_PORT,
        metavar="PORT",
        help="first server port; servers take consecutive free ports from here "
        f"(default: {DEFAULT_BASE_PORT})",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where servers keep their queues across restarts (default: a temporary "
        "directory removed on exit)",
    )
    add_options(p, REBALANCE_INTERVAL, WAVE_TIMEOUT, STATUS_INTERVAL)
    add_options(
        p,
        TOKEN_FOR_READS.with_default(
            False,
            "the balancer requires an API token for reads too (the status page asks for it): "
            "a fresh one per run, in the run directory (its path is printed when ready)",
        ),
    )
    p.add_argument(
        "--ready-timeout",
        type=positive_float,
        default=60.0,
        metavar="S",
        help="give up if the cluster is not ready after this many seconds (default: 60)",
    )
    p.add_argument(
        "--grace",
        type=non_negative_float,
        default=5.0,
        metavar="S",
        help="seconds a child gets to stop after SIGTERM before SIGKILL (default: 5)",
    )
    add_options(
        p,
        LOG_LEVEL.with_default(
            "INFO", "log level of the children (their logs go to files in the run directory)"
        ),
    )
    p.set_defaults(handler=run)


# --- ports ---------------------------------------------------------------------------------


def port_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on `host:port`. SO_REUSEADDR, as the services use, so a
    port whose old connections linger in TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def allocate_ports(base: int, count: int, exclude: set[int]) -> list[int]:
    """`count` free ports from `base` upwards (consecutive unless some are taken)."""
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if port > 65535:
            raise CommandError(f"not enough free ports from {base} for {count} servers")
        if port not in exclude and port_free(port):
            ports.append(port)
        port += 1
    return ports


# --- topology changes ---------------------------------------------------------------------


def server_view(topology: Topology, name: str) -> tuple[object, ...]:
    """What a running server took from the topology at start (a change needs a restart):
    its cpus, neighbours, whether it is the root (linked to the balancer) and the
    settings."""
    spec = topology.server(name)
    return (
        spec.cpus,
        spec.children,
        topology.parents(name),
        topology.root == name,
        topology.settings,
    )


# --- children ------------------------------------------------------------------------------


def _death_signal_preexec() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child die with this process (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    kill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def child_command() -> list[str]:
    """How to run `treewave` in a child: the console script next to this interpreter (so
    `ps` shows `.../treewave node --name NAME`), else the module."""
    script = Path(sys.executable).parent / "treewave"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "treewave.cli.main"]


@dataclass
class Child:
    name: str
    """A server's name, or "balancer"."""
    kind: Literal["node", "balancer"]
    port: int
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    """Deaths in a row, each soon after its start (drives the backoff)."""
    restart_at: float | None = None
    recovering: bool = False
    """Restarted after a death; announce when it is healthy again."""

    @property
    def label(self) -> str:
        return "the balancer" if self.kind == "balancer" else f"server {self.name}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Signal the child's process group (the child and anything it started)."""
        if self.proc is None or self.proc.poll() is not None:
            return  # reaped: its pid may belong to someone else by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def tail(path: Path, lines: int = 5) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def get_json(url: str, timeout: float, token: str = "") -> Any:
    """The JSON body of a 200 answer, or None on any failure; `token`, when given, is sent
    as the balancer's API token."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            if resp.status != 200:
                return None
            return json.loads(resp.read())
    except (OSError, ValueError, http.client.HTTPException):
        return None


class Progress:
    """One progress line: rewritten in place on a terminal, printed when it changes
    otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last = ""
        self.open = False

    def update(self, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        if self.tty:
            self.out.write("\r\x1b[K" + text)
            self.open = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.open:
            self.out.write("\n")
            self.out.flush()
            self.open = False
        self.last = ""


# --- the supervisor ---------------------------------------------------------------------------


@dataclass
class Supervisor:
    topology: Topology
    topology_path: Path
    port: int
    base_port: int
    run_dir: Path
    state_dir: Path
    rebalance_interval: float | None = None
    wave_timeout: float | None = None
    status_interval: float | None = None
    ready_timeout: float = 60.0
    grace: float = 5.0
    log_level: str = "INFO"
    token_for_reads: bool = False
    """The balancer requires its API token for reads too: a fresh token per run
    (`api_token_file`), sent with the supervisor's own requests."""
    api_token: str = ""
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    children: list[Child] = field(default_factory=list)
    stop_signal: int | None = None
    force: bool = False
    reload_requested: bool = False
    generation: int = 0
    retiring: set[str] = field(default_factory=set)
    """Removed servers, still running (and restarted if they die) until the balancer
    reports them retired."""

    def __post_init__(self) -> None:
        self.preexec = _death_signal_preexec()
        self.progress = Progress(self.out)
        self.next_poll = 0.0
        self.last_drain: dict[str, tuple[Any, Any]] = {}

    # signals

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
            return
        if self.stop_signal is not None:
            self.force = True
        self.stop_signal = signum

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {s: signal.signal(s, self.on_signal) for s in sigs}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    @property
    def stopping(self) -> bool:
        return self.stop_signal is not None

    # setup

    def plan(self) -> None:
        if not port_free(self.port):
            raise CommandError(
                f"port {self.port} on {HOST} is already in use (another treewave run?); "
                "choose another with --port"
            )
        names = self.topology.names
        ports = allocate_ports(self.base_port, len(names), {self.port})
        self.peers = {n: f"ws://{HOST}:{p}/ws" for n, p in zip(names, ports, strict=True)}
        self.write_peers()
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / TOPOLOGY_PATH_FILE).write_text(f"{self.topology_path}\n", "utf-8")
        # A fresh link secret per run: servers accept links only from neighbours and the
        # balancer that prove it.
        ensure_secret(self.run_dir / "secret")
        if self.token_for_reads:
            ensure_secret(self.api_token_file)
            self.api_token = read_secret(self.api_token_file, what="API token")
        snapshot = self.snapshot(self.topology)
        for name, port in zip(names, ports, strict=True):
            self.children.append(self.node_child(name, port, snapshot))
        base = child_command()
        argv = [
            *base,
            "balancer",
            *self.common_args(snapshot),
            "--port",
            str(self.port),
            # Its own directory ("balancer" is no server's name): the desired topology and
            # a drain in progress survive its restart.
            "--state-dir",
            str(self.state_dir / "balancer"),
            "--log-level",
            self.log_level,
        ]
        if self.rebalance_interval is not None:
            argv += ["--rebalance-interval", str(self.rebalance_interval)]
        if self.wave_timeout is not None:
            argv += ["--wave-timeout", str(self.wave_timeout)]
        if self.status_interval is not None:
            argv += ["--status-interval", str(self.status_interval)]
        if self.token_for_reads:
            argv += ["--token-for-reads", "--api-token-file", str(self.api_token_file)]
        log = self.run_dir / "logs" / "balancer.log"
        self.children.append(Child("balancer", "balancer", self.port, argv, log))

    @property
    def api_token_file(self) -> Path:
        return self.run_dir / "api-token"

    def write_peers(self) -> None:
        """Every server's URL, removed ones included while they drain (the balancer still
        talks to them); rewritten atomically when servers are added."""
        write_atomic(self.run_dir / "peers.json", json.dumps(self.peers, indent=2) + "\n")

    def snapshot(self, topology: Topology) -> Path:
        """The topology of this generation, as a file its servers start (and restart) from."""
        path = self.run_dir / f"topology-{self.generation}.json"
        path.write_text(topology.dumps(), encoding="utf-8")
        return path

    def common_args(self, topology_file: Path) -> list[str]:
        return [
            "--topology",
            str(topology_file),
            "--host",
            HOST,
            "--peers",
            str(self.run_dir / "peers.json"),
            "--secret-file",
            str(self.run_dir / "secret"),
        ]

    def node_child(self, name: str, port: int, topology_file: Path) -> Child:
        argv = [
            *child_command(),
            "node",
            "--name",
            name,
            *self.common_args(topology_file),
            "--port",
            str(port),
            "--state-dir",
            str(self.state_dir),
            "--log-level",
            self.log_level,
        ]
        return Child(name, "node", port, argv, self.run_dir / "logs" / f"{name}.log")

    def start(self, child: Child) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with child.log_path.open("ab") as log:
            child.proc = subprocess.Popen(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
                preexec_fn=self.preexec,  # safe: one thread, see the module docstring
            )
        child.started_at = time.monotonic()
        child.restart_at = None

    # health

    @property
    def nodes(self) -> list[Child]:
        return [c for c in self.children if c.kind == "node"]

    @property
    def balancer(self) -> Child:
        return self.children[-1]

    def healthy(self, child: Child) -> bool:
        if not child.alive():
            return False
        body = get_json(child.url + "/healthz", timeout=1.0)
        if not isinstance(body, dict) or body.get("status") != "ok":
            return False
        if child.kind == "balancer":
            return bool(body.get("links_up") == body.get("servers") == len(self.topology))
        return True

    def tree_complete(self) -> bool:
        setting = self.wave_timeout or self.topology.settings.wave_timeout_s
        timeout = wave_deadline_s(setting, self.topology.depth, len(self.topology.servers)) + 2.0
        body = get_json(self.balancer.url + "/api/tree", timeout=timeout, token=self.api_token)
        return isinstance(body, dict) and body.get("complete") is True

    # the loop

    def check_children(self) -> None:
        """Notice deaths, and restart children whose backoff has passed."""
        now = time.monotonic()
        for child in self.children:
            if self.stopping:
                return
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self.start(child)
                    child.recovering = True
                    self.say(f"{child.label} restarted (pid {child.pid})")
                continue
            assert child.proc is not None
            code = child.proc.poll()
            if code is None:
                continue
            ran = now - child.started_at
            child.failures = child.failures + 1 if ran < STABLE_S else 1
            delay = min(BACKOFF_FIRST_S * 2 ** (child.failures - 1), BACKOFF_MAX_S)
            child.restart_at = now + delay
            self.warn(
                f"{child.label} (pid {child.pid}, port {child.port}) died: "
                f"{describe_exit(code)}; restarting in {delay:g} s"
            )
            if code > 0:
                for line in tail(child.log_path, 3):
                    self.warn(f"  {child.name}| {line}")

    def say(self, text: str) -> None:
        self.progress.done()
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        self.progress.done()
        print(text, file=self.err, flush=True)

    def wait_ready(self) -> bool:
        """Until every child is healthy and an Echo wave is complete; False if stopped."""
        deadline = time.monotonic() + self.ready_timeout
        total = len(self.nodes)
        up: set[str] = set()
        while not self.stopping:
            self.check_children()
            failing = [c for c in self.children if c.failures >= START_ATTEMPTS]
            if failing:
                self.progress.done()
                raise CommandError(
                    f"{', '.join(c.label for c in failing)} failed to start {START_ATTEMPTS} "
                    "times in a row (the log lines above tell why)"
                )
            for child in self.nodes:
                if child.name not in up and self.healthy(child):
                    up.add(child.name)
                elif child.name in up and not child.alive():
                    up.discard(child.name)
            if len(up) < total:
                self.progress.update(f"waiting for servers: {len(up)}/{total} healthy")
            elif not self.healthy(self.balancer):
                body = get_json(self.balancer.url + "/healthz", timeout=1.0)
                links = body.get("links_up", 0) if isinstance(body, dict) else 0
                self.progress.update(f"waiting for the balancer: linked to {links}/{total} servers")
            else:
                self.progress.update("waiting for a complete Echo wave")
                if self.tree_complete():
                    self.progress.done()
                    for child in self.children:
                        child.recovering = False
                    return True
            if time.monotonic() > deadline:
                self.progress.done()
                self.report_not_ready(up)
                raise CommandError(
                    f"the cluster was not ready after {self.ready_timeout:g} s "
                    "(the log tails above tell why)"
                )
            time.sleep(LOOP_S * 2)
        self.progress.done()
        return False

    def report_not_ready(self, up: set[str]) -> None:
        for child in self.children:
            if child.name in up and child.kind == "node":
                continue
            state = "running" if child.alive() else "not running"
            self.warn(f"{child.label} (port {child.port}, {state}) is not ready; its log ends:")
            for line in tail(child.log_path):
                self.warn(f"  {child.name}| {line}")

    def print_ready(self) -> None:
        url = self.balancer.url
        width = max(len(c.name) for c in self.children)
        lines = [
            f"ready: {len(self.nodes)} servers and the balancer are up",
            f"  status page  {url}/",
            f"  API          {url}/api/tree  (also /api/status, /api/finn, /api/rebalance, "
            "/api/tasks)",
            f"  metrics      {url}/metrics",
            "  servers:",
            *(f"    {c.name:<{width}}  {c.url}  pid {c.pid}" for c in self.nodes),
            f"    {'balancer':<{width}}  {url}  pid {self.balancer.pid}",
            f"  reload       edit {self.topology_path}, then: kill -HUP {os.getpid()}",
            f"  logs         {self.run_dir / 'logs'}",
            f"  state        {self.state_dir}",
            *(
                [f"  API token    {self.api_token_file}  (reads need it too: the page asks)"]
                if self.token_for_reads
                else []
            ),
            "try: treewave status"
            + ("" if self.port == DEFAULT_PORT else f" --balancer {url}")
            + (f" --token-file {self.api_token_file}" if self.token_for_reads else "")
            + "   (Ctrl-C stops everything)",
        ]
        print("\n".join(lines), file=self.out, flush=True)

    def supervise(self) -> None:
        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            if self.retiring and time.monotonic() >= self.next_poll:
                self.next_poll = time.monotonic() + POLL_TOPOLOGY_S
                self.poll_retiring()
            self.check_children()
            for child in self.children:
                if child.recovering and child.restart_at is None and self.healthy(child):
                    child.recovering = False
                    self.say(f"{child.label} is healthy again")
            time.sleep(LOOP_S)

    # topology changes

    def reload(self) -> None:
        """SIGHUP: realise the topology file as it is now (see the module docstring)."""
        try:
            new = load_topology(self.topology_path)
        except TopologyError as exc:
            self.warn(f"reload: {exc.source} is not a valid topology; nothing changed:")
            for problem in exc.problems:
                self.warn(f"  {problem}")
            return
        old = self.topology
        if new.to_json_data() == old.to_json_data():
            self.say("reload: the topology is unchanged")
            return
        self.generation += 1
        snapshot = self.snapshot(new)
        added = [n for n in new.names if n not in old and n not in self.retiring]
        back = [n for n in new.names if n in self.retiring]
        removed = [n for n in old.names if n not in new]
        changed = [n for n in new.names if n in old and server_view(old, n) != server_view(new, n)]
        self.say(
            f"reload: {len(new)} servers: {len(added)} added, {len(removed)} removed, "
            f"{len(changed)} restarting with a changed view, {len(back)} back from retiring"
        )
        ports = allocate_ports(self.base_port, len(added), {self.port, *self.used_ports()})
        for name, port in zip(added, ports, strict=True):
            self.peers[name] = f"ws://{HOST}:{port}/ws"
        self.write_peers()
        started: list[Child] = []
        for name, port in zip(added, ports, strict=True):
            child = self.node_child(name, port, snapshot)
            self.children.insert(len(self.children) - 1, child)  # the balancer stays last
            self.start(child)
            child.recovering = True
            started.append(child)
            self.say(f"server {name} started (port {port}, pid {child.pid})")
        # A server back from retiring runs an older topology (or alone): restart it too.
        restarted = [*changed, *back]
        for name in restarted:
            self.restart_with(self.node(name), snapshot)
        try:
            self.post_topology(new)
        except TopologyApiError as exc:
            self.warn(f"reload: {exc}")
            self.warn("reload: undoing it; the cluster runs the previous topology")
            self.undo(old, started, restarted)
            return
        self.topology = new
        # Restarted, the balancer comes back with the topology it adopted.
        argv = self.balancer.argv
        argv[argv.index("--topology") + 1] = str(snapshot)
        self.retiring = (self.retiring | set(removed)) - set(back)
        self.next_poll = 0.0
        self.say(
            "reload: the balancer adopted the new topology"
            + (f"; draining {', '.join(sorted(self.retiring))}" if self.retiring else "")
        )

    def used_ports(self) -> set[int]:
        return {c.port for c in self.children}

    def node(self, name: str) -> Child:
        for child in self.children:
            if child.kind == "node" and child.name == name:
                return child
        raise KeyError(name)

    def restart_with(self, child: Child, topology_file: Path) -> None:
        """Stop one server and start it again from `topology_file` (same port, same state
        directory: its queue survives)."""
        i = child.argv.index("--topology")
        child.argv[i + 1] = str(topology_file)
        self.stop_child(child)
        self.start(child)
        child.recovering = True
        self.say(f"server {child.name} restarted with its new view (pid {child.pid})")

    def stop_child(self, child: Child) -> None:
        child.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while child.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if child.alive():
            child.signal(signal.SIGKILL)
        if child.proc is not None:
            child.proc.wait()
        child.restart_at = None

    def post_topology(self, topology: Topology) -> None:
        """Hand the topology to the balancer; retried while it cannot be reached (it may be
        restarting); a refusal is final."""
        deadline = time.monotonic() + POST_ATTEMPTS_S
        while True:
            try:
                post_topology(self.balancer.url, topology.to_json_data(), token=self.api_token)
                return
            except TopologyRejected:
                raise
            except TopologyApiError as exc:
                if exc.missing or time.monotonic() > deadline or self.stopping:
                    raise
            time.sleep(0.5)

    def undo(self, old: Topology, started: list[Child], restarted: list[str]) -> None:
        """Back to `old`: stop the servers just added (deleting the state they made) and
        restart the changed ones from the previous snapshot."""
        for child in started:
            self.stop_child(child)
            self.children.remove(child)
            self.peers.pop(child.name, None)
            self.delete_state(child.name)
        self.write_peers()
        self.generation += 1
        snapshot = self.snapshot(old)
        for name in restarted:
            self.restart_with(self.node(name), snapshot)

    def delete_state(self, name: str) -> None:
        # The server's task store (node.store: SQLite and its WAL files) and a JSON state
        # file of earlier releases, imported or not.
        suffixes = (".sqlite3", ".sqlite3-wal", ".sqlite3-shm", ".json", ".json.imported")
        for suffix in (*suffixes, ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / f"{name}{suffix}").unlink()

    def poll_retiring(self) -> None:
        """Stop each retiring server the balancer reports retired, and delete its state."""
        try:
            state = get_topology(self.balancer.url, token=self.api_token)
        except TopologyApiError:
            return  # the balancer may be restarting: ask again later
        for name in sorted(self.retiring):
            if state.is_retired(name):
                child = self.node(name)
                self.stop_child(child)
                self.children.remove(child)
                self.retiring.discard(name)
                self.peers.pop(name, None)
                self.write_peers()
                self.delete_state(name)
                moved = state.retired[name].get("moved", 0)
                self.say(f"server {name} retired (moved {moved} tasks): stopped, state deleted")
            elif name in state.retiring:
                info = state.retiring[name]
                held = (info.get("queued"), info.get("running"))
                if self.last_drain.get(name) != held:
                    self.last_drain[name] = held
                    self.say(f"server {name} draining: {held[0]} queued, {held[1]} running")

    def stop_all(self) -> None:
        live = [c for c in self.children if c.alive()]
        if live:
            why = signal.Signals(self.stop_signal).name if self.stop_signal else "shutdown"
            self.say(f"stopping {len(live)} processes ({why})...")
        for child in live:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while any(c.alive() for c in live) and time.monotonic() < deadline and not self.force:
            time.sleep(0.05)
        for child in live:
            if child.alive():
                self.warn(f"{child.label} did not stop in time; killing it")
                child.signal(signal.SIGKILL)
        for child in self.children:
            if child.proc is not None:
                child.proc.wait()
        if live:
            self.say("stopped")

    def run(self) -> int:
        with self.signals():
            try:
                self.plan()
                self.say(
                    f"starting {len(self.nodes)} servers (ports {self.nodes[0].port}-"
                    f"{self.nodes[-1].port}) and the balancer (port {self.port})"
                )
                for child in self.children:
                    self.start(child)
                if self.wait_ready():
                    self.print_ready()
                    self.supervise()
            finally:
                self.progress.done()
                self.stop_all()
        return 0


def sweep_stale_run_dirs() -> None:
    """Remove run directories left by supervisors that were killed (SIGKILL cannot be
    caught, so they could not clean up): only those whose recorded supervisor is gone."""
    for path in Path(tempfile.gettempdir()).glob(RUN_DIR_PREFIX + "*"):
        try:
            pid = int((path / PID_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not ours, or still being set up
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue  # somebody else's live process


def run(args: argparse.Namespace) -> int:
    sweep_stale_run_dirs()
    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    (run_dir / PID_FILE).write_text(f"{os.getpid()}\n", encoding="utf-8")
    try:
        supervisor = Supervisor(
            topology=topology,
            topology_path=args.topology.resolve(),
            port=args.port,
            base_port=args.base_port,
            run_dir=run_dir,
            state_dir=(args.state_dir.resolve() if args.state_dir else run_dir / "state"),
            rebalance_interval=args.rebalance_interval,
            wave_timeout=args.wave_timeout,
            status_interval=args.status_interval,
            ready_timeout=args.ready_timeout,
            grace=args.grace,
            log_level=args.log_level,
            token_for_reads=args.token_for_reads,
        )
        return supervisor.run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
