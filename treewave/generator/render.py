"""Render a topology's deployment files, for one of two targets: Docker Compose (compose
file, Prometheus config, Grafana dashboard) or a Docker Swarm stack (stack file and the
Prometheus config it mounts).

Everything derives from the topology file (one source of truth). Rendering is
deterministic, so the committed default files can be checked for drift byte for byte.
Each target has one Jinja template; what both render alike lives in `shared.j2`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import jinja2

from treewave.core.topology import Topology
from treewave.generator.dashboard import dashboard_json
from treewave.wire.secretfile import ensure_secret

__all__ = [
    "COMPOSE_FILE",
    "DASHBOARD_FILE",
    "DASHBOARD_PROVISIONING_FILE",
    "DATASOURCE_PROVISIONING_FILE",
    "DEFAULT_CPU_PER_SLOT",
    "HOST_LABEL",
    "PLACEMENT_FILE",
    "PROMETHEUS_FILE",
    "STACK_FILE",
    "SWARM_SECRET_FILES",
    "TARGETS",
    "TemplateNotFoundError",
    "find_compose_template",
    "host_names",
    "periodic_intervals",
    "place_servers",
    "read_placement",
    "render",
    "render_swarm",
    "render_swarm_texts",
    "render_texts",
    "topology_hash",
    "view_hash",
]

TARGETS = ("compose", "swarm")

COMPOSE_TEMPLATE_NAME = "compose.template.yml"
COMPOSE_FILE = Path("compose.yml")
PROMETHEUS_FILE = Path("prometheus/prometheus.yml")
DASHBOARD_FILE = Path("grafana/dashboards/treewave.json")
DATASOURCE_PROVISIONING_FILE = Path("grafana/provisioning/datasources/prometheus.yml")
DASHBOARD_PROVISIONING_FILE = Path("grafana/provisioning/dashboards/treewave.yml")
# Static files the compose file mounts, copied so a rendered directory is self-contained.
STATIC_FILES = {
    DATASOURCE_PROVISIONING_FILE: "grafana-datasource.yml",
    DASHBOARD_PROVISIONING_FILE: "grafana-dashboards.yml",
}
STACK_FILE = Path("stack.yml")
STACK_TEMPLATE_NAME = "stack.yml.j2"
HOST_LABEL = "treewave.host"
"""The swarm node label that pins servers to hosts: `treewave.host=h1`, `=h2`, ..."""
SWARM_SECRET_FILES = (Path("secrets/link-secret"), Path("secrets/api-token"))
"""Made by the render (once, never overwritten) and handed to Swarm as secrets."""
PLACEMENT_FILE = Path("placement.json")
"""Which host each server was placed on, kept beside the stack file: a server's queue is in
a volume on its host, so a re-render must never move it (it would start empty elsewhere)."""
_HOST_NAME = re.compile(r"h[1-9][0-9]*")
DEFAULT_CPU_PER_SLOT = 0.05
"""CPU reserved per CPU slot: tasks are emulated (a slot is held, not burnt), so a server
needs little real CPU; the reservation still makes the scheduler spread big servers."""
PACKAGE_TEMPLATES = Path(__file__).resolve().parent / "templates"
REPO_ROOT = Path(__file__).resolve().parents[2]  # the source tree: treewave/generator/ -> root


HEALTHCHECKS_PER_S = 2
"""The most healthchecks per second a rendered stack runs: each is a `docker exec`, about
50 ms of CPU in runc, the containerd shim and dockerd (measured with bench/idle_cpu.py),
so 300 servers checked every 5 s would keep three quarters of a 2-core machine busy."""
MIN_HEALTHCHECK_INTERVAL_S = 5
FAST_HEALTHCHECK_INTERVAL_S = 5
"""The root's, the balancer's and Prometheus's checks (and a Swarm stack's servers')."""
ROOT_HEALTHCHECK_INTERVAL_S = FAST_HEALTHCHECK_INTERVAL_S
"""The root is checked as often as a small stack's servers: the balancer waits for it."""
HEALTHCHECK_TIMEOUT_S = 10
MIN_HEALTHCHECK_RETRIES = 3
MIN_SCRAPE_INTERVAL_S = 5
MAX_SCRAPE_INTERVAL_S = 15
"""The dashboard's rates look back one minute: at least four scrapes."""
SCRAPES_PER_S = 20.0
MIN_START_PERIOD_S = 30
START_SECONDS_PER_SERVER = 1.0
"""Starting a container costs about 0.9 s of the machine on 2 cores (dockerd, runc, the
shim and the interpreter: 300 servers take about 260 s to be up). A slow check on a host
busy starting hundreds of containers must not mark a service unhealthy (and fail `up
--wait`): the start period and the retries cover the whole start-up."""


def _doubling(smallest: int, at_least: float) -> int:
    """The first of smallest, 2 x smallest, 4 x smallest, ... that is >= `at_least`."""
    interval = smallest
    while interval < at_least:
        interval *= 2
    return interval


def periodic_intervals(servers: int) -> dict[str, float]:
    """The rendered stack's periodic work, sized by its number of servers: every service's
    healthcheck start period covers the stack's start-up (30 s up to 30 servers, then
    doubling: 60, 120, 240, 480 s ...; a check passing early still makes a service healthy
    at once) and, once healthy, a service is marked unhealthy only after failing its checks
    for about as long (the retries; Docker counts failures after the first success even
    within the start period, and a `docker exec` on a host starting 200 containers can take
    longer than its timeout several times in a row); a server's healthcheck interval grows
    so the stack runs at most `HEALTHCHECKS_PER_S` checks a second, Prometheus's scrape
    interval so it scrapes at most `SCRAPES_PER_S` targets a second (up to 15 s).
    A 10-server stack keeps 5 s for both. The healthcheck interval
    doubles in steps (5, 10, 20, 40, 80, 160 s ...) rather than following the count: it is
    part of every server's service definition, and a change makes Compose recreate every
    server, so adding one server to a topology should rarely change it."""
    node_interval = _doubling(MIN_HEALTHCHECK_INTERVAL_S, servers / HEALTHCHECKS_PER_S)
    start_period = _doubling(MIN_START_PERIOD_S, servers * START_SECONDS_PER_SERVER)

    def retries(interval: int) -> int:
        return max(
            MIN_HEALTHCHECK_RETRIES, math.ceil(start_period / (interval + HEALTHCHECK_TIMEOUT_S))
        )

    return {
        "healthchecks_per_s": HEALTHCHECKS_PER_S,
        "node_healthcheck_interval_s": node_interval,
        "root_healthcheck_interval_s": ROOT_HEALTHCHECK_INTERVAL_S,
        "healthcheck_start_period_s": start_period,
        "healthcheck_timeout_s": HEALTHCHECK_TIMEOUT_S,
        "node_healthcheck_retries": retries(node_interval),
        "fast_healthcheck_retries": retries(FAST_HEALTHCHECK_INTERVAL_S),
        "scrape_interval_s": max(
            MIN_SCRAPE_INTERVAL_S, min(MAX_SCRAPE_INTERVAL_S, math.ceil(servers / SCRAPES_PER_S))
        ),
    }


class TemplateNotFoundError(FileNotFoundError):
    """No compose template where one was looked for."""


def find_compose_template(topology_path: Path, explicit: Path | None = None) -> Path:
    """The compose template to use: `explicit` if given, else `compose.template.yml` beside
    the topology file, else the one at the root of the source tree this package sits in."""
    if explicit is not None:
        if not explicit.is_file():
            raise TemplateNotFoundError(f"compose template {explicit} does not exist")
        return explicit
    candidates = [topology_path.parent / COMPOSE_TEMPLATE_NAME, REPO_ROOT / COMPOSE_TEMPLATE_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise TemplateNotFoundError(
        f"no {COMPOSE_TEMPLATE_NAME} found (tried {tried}); pass --template"
    )


def default_build_context(compose_template: Path, out_dir: Path) -> str:
    """The image's build context as the rendered compose file sees it: the source tree the
    template sits in (it holds docker/Dockerfile), relative to `out_dir`; else "."."""
    source_tree = compose_template.resolve().parent
    if not (source_tree / "docker" / "Dockerfile").is_file():
        return "."
    return Path(os.path.relpath(source_tree, out_dir.resolve())).as_posix()


def _environment(search_path: Path) -> jinja2.Environment:
    """Templates from `search_path`, then the package's (where the shared parts are)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(search_path), str(PACKAGE_TEMPLATES)]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # YAML output, not HTML
    )


def _write(path: Path, text: str) -> Path:
    """Write only when the bytes change, so unchanged files keep their timestamps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


def topology_hash(topology: Topology) -> str:
    """A short content hash of the whole topology: in the balancer's definition, so Compose
    recreates the balancer whenever the topology changes (a bind-mounted file changing
    underneath would not)."""
    return hashlib.sha256(topology.dumps().encode()).hexdigest()[:16]


def view_hash(topology: Topology, name: str) -> str:
    """A short hash of what one server takes from the topology at start (cpus, parents,
    children, whether it is the root, the settings): in its definition, so Compose
    recreates exactly the servers whose view changed (their queue volume stays)."""
    view = topology.view(name).to_json_data()
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:16]


def render_texts(
    topology: Topology,
    topology_file_name: str,
    compose_template: Path,
    build_context: str = ".",
) -> dict[Path, str]:
    """The rendered files' texts keyed by their path relative to the output directory."""
    source = topology_file_name if topology_file_name.startswith(".") else f"./{topology_file_name}"
    context = {
        "topology": topology,
        "topology_file": topology_file_name,
        "topology_source": source,
        "build_context": build_context,
        **periodic_intervals(len(topology.servers)),
        "topology_hash": topology_hash(topology),
        "view_hashes": {name: view_hash(topology, name) for name in topology.names},
    }
    compose_env = _environment(compose_template.parent)
    compose = compose_env.get_template(compose_template.name).render(context)
    prometheus = _environment(PACKAGE_TEMPLATES).get_template("prometheus.yml.j2").render(context)
    texts = {
        COMPOSE_FILE: compose,
        PROMETHEUS_FILE: prometheus,
        DASHBOARD_FILE: dashboard_json(topology),
    }
    for rel, name in STATIC_FILES.items():
        texts[rel] = (PACKAGE_TEMPLATES / name).read_text(encoding="utf-8")
    return texts


def render(
    topology: Topology,
    topology_file_name: str,
    out_dir: Path,
    *,
    template: Path | None = None,
    build_context: str | None = None,
) -> list[Path]:
    """Write `compose.yml`, `prometheus/prometheus.yml`, `grafana/dashboards/treewave.json`
    and the Grafana provisioning files into `out_dir`; return their paths.

    `topology_file_name` is the topology file's path relative to `out_dir` (the compose file
    bind-mounts it); `build_context` is the source tree to build the image from, as the
    compose file sees it (relative to `out_dir`, or absolute); by default the tree holding
    the compose template.
    """
    if Path(topology_file_name).is_absolute():
        raise ValueError("topology_file_name must be relative to out_dir (portable files)")
    compose_template = find_compose_template(out_dir / topology_file_name, template)
    if build_context is None:
        build_context = default_build_context(compose_template, out_dir)
    texts = render_texts(topology, topology_file_name, compose_template, build_context)
    return [_write(out_dir / rel, text) for rel, text in texts.items()]


def host_names(hosts: int) -> list[str]:
    """The label values of `hosts` hosts: h1, h2, ..."""
    if hosts < 1:
        raise ValueError(f"--hosts must be at least 1, got {hosts}")
    return [f"h{i}" for i in range(1, hosts + 1)]


def place_servers(
    topology: Topology, hosts: int, previous: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Server name -> host label. A server placed before keeps its host (its queue lives
    there); a new one goes to the host with the fewest servers, the lowest on a tie, in file
    order, so a first render is round-robin: server i on host i mod N, and a subtree listed
    in a row is spread out. Raises ValueError when a server of `topology` was placed on a
    host beyond `hosts`."""
    names = host_names(hosts)
    before = previous or {}
    beyond = sorted(
        f"{s.name} (on {before[s.name]})"
        for s in topology.servers
        if s.name in before and before[s.name] not in names
    )
    if beyond:
        raise ValueError(
            f"--hosts {hosts} leaves out the host of {', '.join(beyond)}, placed there by an "
            f"earlier render ({PLACEMENT_FILE}): keep --hosts, or remove those servers first "
            "(drained by a topology change)"
        )
    placed = {s.name: before[s.name] for s in topology.servers if s.name in before}
    load = Counter(placed.values())
    for server in topology.servers:
        if server.name not in placed:
            host = min(names, key=lambda h: (load[h], names.index(h)))
            placed[server.name] = host
            load[host] += 1
    return {s.name: placed[s.name] for s in topology.servers}


def read_placement(path: Path) -> dict[str, str]:
    """An earlier render's placement file, or {} when there is none. Raises ValueError
    naming the file when it is not a JSON object of server name -> host label (h1, h2, ...)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable placement file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of server name -> host (h1, h2, ...)")
    bad = sorted(
        str(k) for k, v in data.items() if not (isinstance(v, str) and _HOST_NAME.fullmatch(v))
    )
    if bad:
        raise ValueError(f"{path}: not a host label (h1, h2, ...) for {', '.join(bad)}")
    return {str(k): str(v) for k, v in data.items()}


def render_swarm_texts(
    topology: Topology,
    topology_file_name: str,
    *,
    hosts: int = 1,
    cpu_per_slot: float = DEFAULT_CPU_PER_SLOT,
    placement: Mapping[str, str] | None = None,
) -> dict[Path, str]:
    """The Swarm target's files (stack file, Prometheus config) by relative path;
    `placement` as made by `place_servers` (default: a first render's)."""
    if not 0 < cpu_per_slot <= 64:
        raise ValueError(f"--cpu-per-slot must be in (0, 64], got {cpu_per_slot}")
    source = topology_file_name if topology_file_name.startswith(".") else f"./{topology_file_name}"
    env = _environment(PACKAGE_TEMPLATES)
    context = {
        "topology": topology,
        "topology_file": topology_file_name,
        "topology_source": source,
        **periodic_intervals(len(topology.servers)),
    }
    prometheus = env.get_template("prometheus.yml.j2").render(context)
    digest = hashlib.sha256(f"{topology.dumps()}\0{prometheus}".encode()).hexdigest()[:12]
    names = host_names(hosts)
    stack = env.get_template(STACK_TEMPLATE_NAME).render(
        context,
        hosts=names,
        first_host=names[0],
        host_label=HOST_LABEL,
        placement=placement or place_servers(topology, hosts),
        cpu_per_slot=cpu_per_slot,
        config_suffix=digest,
    )
    return {STACK_FILE: stack, PROMETHEUS_FILE: prometheus}


def render_swarm(
    topology: Topology,
    topology_file_name: str,
    out_dir: Path,
    *,
    hosts: int = 1,
    cpu_per_slot: float = DEFAULT_CPU_PER_SLOT,
) -> list[Path]:
    """Write `stack.yml` and `prometheus/prometheus.yml` into `out_dir`, and the link secret
    and API token under `out_dir/secrets/` unless they exist (Swarm secrets cannot change
    while a stack uses them, and a new secret would lock out running servers). Servers keep
    the hosts an earlier render into `out_dir` gave them (`placement.json`, which remembers
    removed servers too, should one come back while its queue is still on its host)."""
    if Path(topology_file_name).is_absolute():
        raise ValueError("topology_file_name must be relative to out_dir (portable files)")
    previous = read_placement(out_dir / PLACEMENT_FILE)
    placement = place_servers(topology, hosts, previous)
    texts = render_swarm_texts(
        topology, topology_file_name, hosts=hosts, cpu_per_slot=cpu_per_slot, placement=placement
    )
    remembered = dict(sorted({**previous, **placement}.items()))
    texts[PLACEMENT_FILE] = json.dumps(remembered, indent=2) + "\n"
    written = [_write(out_dir / rel, text) for rel, text in texts.items()]
    for rel in SWARM_SECRET_FILES:
        ensure_secret(out_dir / rel)
        written.append(out_dir / rel)
    return written
