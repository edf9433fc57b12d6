"""`treewave generate` and `treewave render`: make a topology, derive the deployment files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from treewave.cli.argtypes import non_negative_int, positive_float, positive_int
from treewave.cli.errors import CommandError, ConfigError
from treewave.cli.settings import TOPOLOGY, add_options
from treewave.core.topology import Topology, TopologyError
from treewave.generator.generate import generate
from treewave.generator.render import (
    DEFAULT_CPU_PER_SLOT,
    HOST_LABEL,
    TARGETS,
    TemplateNotFoundError,
    find_compose_template,
    render,
    render_swarm,
)
from treewave.wire.topology_file import load_topology

__all__ = ["register"]

GENERATE_EXAMPLE = """\
examples:
  treewave generate --nodes 30 --seed 7 --extra-parents 3 --out topology.json --render
  treewave generate --nodes 1000 --cpus 2-8 --tasks 0-10 --out big.json
"""

RENDER_EXAMPLE = """\
examples:
  treewave render                                # topology.json -> compose.yml, ...
  treewave render --topology big.json --out-dir deploy/big
  treewave render --target swarm --hosts 3 --out-dir deploy/swarm
      # -> deploy/swarm/stack.yml; then: docker stack deploy -c deploy/swarm/stack.yml treewave
"""


def _range(text: str) -> tuple[int, int]:
    """Parse `LO-HI` (or a single `N`) into an inclusive range."""
    lo_text, sep, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range like 1-4") from None
    if lo < 0 or lo > hi:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range LO-HI with 0 <= LO <= HI")
    return lo, hi


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="make a random topology (word-named servers, reproducible by seed)",
        description="Write a random rooted DAG of servers named by random words. The same "
        "arguments and seed always give the same file.",
        epilog=GENERATE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--nodes", type=positive_int, required=True, help="number of servers")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    gen.add_argument(
        "--max-children",
        type=positive_int,
        default=3,
        help="children per server at most (default: 3)",
    )
    gen.add_argument(
        "--extra-parents",
        type=non_negative_int,
        default=0,
        help="extra parent links beyond the tree, keeping it acyclic (default: 0)",
    )
    gen.add_argument(
        "--cpus",
        type=_range,
        default=(1, 4),
        metavar="LO-HI",
        help="cpus per server (default: 1-4)",
    )
    gen.add_argument(
        "--tasks",
        type=_range,
        default=(0, 3),
        metavar="LO-HI",
        help="initial tasks per server (default: 0-3)",
    )
    gen.add_argument(
        "--out",
        type=Path,
        default=Path("topology.json"),
        help="file to write (default: topology.json)",
    )
    gen.add_argument(
        "--render", action="store_true", help="render the deployment files right after"
    )
    gen.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where --render writes (default: the directory of --out)",
    )
    gen.add_argument(
        "--template", type=Path, default=None, help="compose template for --render (as for render)"
    )
    gen.set_defaults(handler=run_generate)

    ren = subparsers.add_parser(
        "render",
        help="render compose.yml, the Prometheus config and the dashboard from a topology",
        description="Render compose.yml, prometheus/prometheus.yml and "
        "grafana/dashboards/treewave.json from a topology file and compose.template.yml.",
        epilog=RENDER_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(ren, TOPOLOGY)
    ren.add_argument(
        "--out-dir", type=Path, default=Path("."), help="output directory (default: .)"
    )
    ren.add_argument(
        "--template",
        type=Path,
        default=None,
        help="compose template (default: compose.template.yml beside the topology, "
        "else the one in the treewave source tree)",
    )
    ren.add_argument(
        "--target",
        choices=TARGETS,
        default="compose",
        help="compose (default): compose.yml and friends; swarm: a Docker Swarm stack.yml, "
        "its Prometheus config and secrets/ (link secret, API token; made once)",
    )
    ren.add_argument(
        "--hosts",
        type=positive_int,
        default=1,
        help=f"swarm: hosts to spread servers over; host N is the swarm node labelled "
        f"{HOST_LABEL}=hN (default: 1). A first render goes round-robin in topology order; "
        "later renders into the same --out-dir keep every server on its host "
        "(placement.json) and put new ones on the hosts with the fewest",
    )
    ren.add_argument(
        "--cpu-per-slot",
        type=positive_float,
        default=DEFAULT_CPU_PER_SLOT,
        help="swarm: real CPU reserved per CPU slot of a server (default: %(default)s)",
    )
    ren.set_defaults(handler=run_render)


def _load(topology_path: Path) -> Topology:
    try:
        return load_topology(topology_path)
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None


def _relative_topology(topology_path: Path, out_dir: Path) -> str:
    """The topology file as the rendered files refer to it: relative to `out_dir`, so the
    output directory can move together with it (and no machine path leaks in)."""
    return Path(os.path.relpath(topology_path.resolve(), out_dir.resolve())).as_posix()


def _render_files(topology_path: Path, out_dir: Path, template: Path | None) -> list[Path]:
    topology = _load(topology_path)
    try:
        compose_template = find_compose_template(topology_path, template)
    except TemplateNotFoundError as exc:
        raise CommandError(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    topology_rel = _relative_topology(topology_path, out_dir)
    try:
        return render(topology, topology_rel, out_dir, template=compose_template)
    except OSError as exc:
        raise CommandError(f"cannot write the rendered files: {exc}") from None


def _render_swarm_files(
    topology_path: Path, out_dir: Path, hosts: int, cpu_per_slot: float
) -> list[Path]:
    topology = _load(topology_path)
    if hosts > len(topology.servers):
        raise CommandError(
            f"--hosts {hosts} is more than the {len(topology.servers)} servers of {topology_path}"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        topology_rel = _relative_topology(topology_path, out_dir)
        return render_swarm(topology, topology_rel, out_dir, hosts=hosts, cpu_per_slot=cpu_per_slot)
    except OSError as exc:
        raise CommandError(f"cannot write the rendered files: {exc}") from None
    except ValueError as exc:  # the placement file or --hosts against it
        raise ConfigError(str(exc)) from None


def run_generate(args: argparse.Namespace) -> int:
    try:
        topology = generate(
            args.nodes,
            args.seed,
            max_children=args.max_children,
            extra_parents=args.extra_parents,
            cpus=args.cpus,
            tasks=args.tasks,
        )
    except ValueError as exc:  # the placement file or --hosts against it
        raise ConfigError(str(exc)) from None
    out: Path = args.out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(topology.dumps(), encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc}") from None
    print(
        f"wrote {out}: {len(topology)} servers, {len(topology.edges)} links, "
        f"root {topology.root}, depth {topology.depth}"
    )
    if args.render:
        out_dir = args.out_dir if args.out_dir is not None else out.parent
        for path in _render_files(out, out_dir, args.template):
            print(f"wrote {path}")
    return 0


def run_render(args: argparse.Namespace) -> int:
    if args.target == "swarm":
        if args.template is not None:
            raise CommandError("--template is for --target compose; the swarm stack has its own")
        paths = _render_swarm_files(args.topology, args.out_dir, args.hosts, args.cpu_per_slot)
    else:
        paths = _render_files(args.topology, args.out_dir, args.template)
    for path in paths:
        print(f"wrote {path}")
    return 0
