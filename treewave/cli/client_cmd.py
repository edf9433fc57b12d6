"""Commands that talk to a running balancer: `treewave status`, `submit`, `finn`,
`rebalance`.

Only the standard library (urllib) is used. Every command takes `--balancer URL` (default
`$TREEWAVE_BALANCER` or http://127.0.0.1:7999). A balancer that does not answer, or an API
error (`{"error": ...}`), becomes one line on stderr and exit code 1.

Answers are read through the API's own models (`treewave.core.api`), so an answer of
the wrong shape is one clear error; the renderers (`render_tree`, ...) are pure functions
of those models' JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treewave.cli.api_client import Client
from treewave.cli.argtypes import non_negative_int, positive_float, positive_int
from treewave.cli.errors import CommandError
from treewave.cli.settings import BALANCER_URL, add_options
from treewave.core.api import (
    ClusterStatus,
    FinnResult,
    RebalanceResult,
    SubmitResult,
    TopologyStatus,
    TreeSnapshot,
)
from treewave.core.load import pressure_of

__all__ = [
    "add_token_file",
    "api_token",
    "load_bar",
    "load_text",
    "register",
    "render_finn",
    "render_migration",
    "render_rebalance",
    "render_tree",
    "summary_line",
]

BAR_WIDTH = 12
RUN_CELL, QUEUED_CELL, FREE_CELL = "█", "▓", "░"
MIDDLE, LAST = "├── ", "└── "


# --- rendering (pure) ----------------------------------------------------------------------------


def pressure(node: Mapping[str, Any]) -> float:
    """The server's pressure as the balancer reports it (expected work per CPU, seconds;
    `core.load.pressure`): never recomputed here."""
    return float(node.get("pressure", 0.0))


def load_bar(running: int, queued: int, cpus: int, width: int = BAR_WIDTH) -> str:
    """`[███▓▓░░░]`: the bar is the server's capacity (cpus); █ running, ▓ queued, ░ free.
    Work beyond capacity fills the bar and adds `+` after it."""
    cpus = max(cpus, 1)
    total = running + queued
    run_cells = min(width, round(width * running / cpus))
    if running > 0:
        run_cells = max(run_cells, 1)
    used = min(width, round(width * total / cpus))
    if queued > 0 and run_cells < width:
        used = max(used, run_cells + 1)
    queue_cells = max(0, used - run_cells)
    free = width - run_cells - queue_cells
    over = "+" if total > cpus else " "
    return f"[{RUN_CELL * run_cells}{QUEUED_CELL * queue_cells}{FREE_CELL * free}]{over}"


def load_text(running: int, queued: int, cpus: int) -> str:
    unit = "cpu" if cpus == 1 else "cpus"
    if running == 0 and queued == 0:
        return f"idle / {cpus} {unit}"
    return f"{running} run + {queued} queued / {cpus} {unit}"


_COLOURS = {"low": "\x1b[32m", "mid": "\x1b[33m", "high": "\x1b[31m", "dim": "\x1b[2m"}
_RESET = "\x1b[0m"


def _colour_band(node: Mapping[str, Any]) -> str:
    """The server's colour from the `level` the balancer reports (`core.load.load_level`,
    as on the status page): red when overloaded, yellow in the band below, else green."""
    level = int(node.get("level", 0))
    return "high" if level >= 5 else "mid" if level == 4 else "low"


@dataclass(frozen=True)
class _Line:
    prefix: str
    name: str
    node: Mapping[str, Any] | None
    note: str
    ref: bool


def render_tree(
    tree: Mapping[str, Any], *, colour: bool = False, bar_width: int = BAR_WIDTH
) -> str:
    """The tree (a DAG, drawn as a tree) with a load bar per server, then a summary line.

    A server with several parents is drawn in full under the first parent that reaches it
    (depth first, in file order), marked `(also under X)`; under each other parent it
    appears as one line `↑ name (drawn under Y)`. Servers the wave did not reach are drawn
    with `no answer`.
    """
    nodes = {str(n["name"]): n for n in tree.get("nodes", [])}
    edges = [(str(e["source"]), str(e["target"])) for e in tree.get("edges", [])]
    missing = [str(m) for m in tree.get("missing", [])]
    names: list[str] = list(nodes)
    for a, b in edges:
        for n in (a, b):
            if n not in names:
                names.append(n)
    names += [m for m in missing if m not in names]
    children: dict[str, list[str]] = {n: [] for n in names}
    parents: dict[str, list[str]] = {n: [] for n in names}
    for a, b in edges:
        children[a].append(b)
        parents[b].append(a)
    roots = [n for n in names if not parents[n]] or names[:1]

    lines: list[_Line] = []
    drawn_under: dict[str, str | None] = {}

    def draw(start: str) -> None:
        # Depth first, iteratively (a long chain must not hit the recursion limit).
        stack: list[tuple[str, str | None, str, str]] = [(start, None, "", "")]
        while stack:
            name, parent, prefix, branch = stack.pop()
            if name in drawn_under:
                where = drawn_under[name]
                note = f"(drawn under {where})" if where else "(drawn above)"
                lines.append(_Line(prefix + branch, "↑ " + name, None, note, True))
                continue
            drawn_under[name] = parent
            others = [p for p in parents[name] if p != parent]
            note = f"(also under {', '.join(others)})" if others else ""
            lines.append(_Line(prefix + branch, name, nodes.get(name), note, False))
            kids = children[name]
            inner = prefix + ("" if not branch else "    " if branch == LAST else "│   ")
            for i in reversed(range(len(kids))):
                stack.append((kids[i], name, inner, LAST if i == len(kids) - 1 else MIDDLE))

    for root in roots:
        draw(root)
    for name in names:  # anything no root reaches (cannot happen for a valid topology)
        if name not in drawn_under:
            draw(name)

    width = max(len(line.prefix) + len(line.name) for line in lines)
    out: list[str] = []
    for line in lines:
        label = f"{line.prefix}{line.name}".ljust(width)
        if line.ref:
            text = f"{label}  {line.note}"
            out.append(_paint(text, "dim", colour))
            continue
        node = line.node
        if node is None:
            text = f"{label}  [{'?' * bar_width}]  no answer (missing from this wave)"
            out.append(_paint(text, "high", colour) + (f"  {line.note}" if line.note else ""))
            continue
        running, queued = int(node.get("running", 0)), int(node.get("queued", 0))
        cpus = int(node.get("cpus", 1))
        bar = load_bar(running, queued, cpus, bar_width)
        text = f"{label}  {_paint(bar, _colour_band(node), colour)} "
        text += load_text(running, queued, cpus) + f" · {pressure(node):.2f} s/cpu"
        if line.note:
            text += f"  {line.note}"
        out.append(text.rstrip())
    out.append(summary_line(tree))
    return "\n".join(out)


def _paint(text: str, level: str, colour: bool) -> str:
    return f"{_COLOURS[level]}{text}{_RESET}" if colour else text


def summary_line(tree: Mapping[str, Any]) -> str:
    nodes = list(tree.get("nodes", []))
    missing = [str(m) for m in tree.get("missing", [])]
    running = sum(int(n.get("running", 0)) for n in nodes)
    queued = sum(int(n.get("queued", 0)) for n in nodes)
    cpus = sum(int(n.get("cpus", 0)) for n in nodes)
    servers = len(nodes) + len(missing)
    work = sum(float(n.get("expected_work_s", 0.0)) for n in nodes)
    max_p = max((pressure(n) for n in nodes), default=0.0)
    cluster_p = pressure_of(work, cpus) if cpus else 0.0
    parts = [
        f"{servers} servers",
        f"{running} running + {queued} queued / {cpus} cpus ({work:.1f} s of work)",
        f"imbalance {max_p - cluster_p:.2f} s (max pressure {max_p:.2f} s/cpu"
        f" - cluster {cluster_p:.2f} s/cpu)",
    ]
    if tree.get("complete") and not missing:
        parts.append("complete")
    else:
        parts.append(f"partial, missing {', '.join(missing) or '?'}")
    if isinstance(tree.get("duration_s"), (int, float)):
        parts.append(
            f"echo {1000 * float(tree['duration_s']):.1f} ms, {tree.get('messages', '?')} messages"
        )
    return " · ".join(parts)


def render_migration(migration: Mapping[str, Any], *, bar_width: int = BAR_WIDTH) -> str:
    """Servers leaving the topology and what they still hold (`GET /api/topology`'s
    `migration`); "" when nothing is retiring or being released."""
    retiring: Mapping[str, Mapping[str, Any]] = migration.get("retiring") or {}
    releasing = list(migration.get("releasing") or [])
    if not retiring and not releasing:
        return ""
    out: list[str] = []
    if retiring:
        n = len(retiring)
        out.append(
            f"draining: {n} retiring server{'s' if n != 1 else ''} "
            f"(drain grace {float(migration.get('drain_grace_s', 0)):g} s); "
            "they take no new tasks and hand their queue to the new topology"
        )
        width = max(len(name) for name in retiring)
        for name, held in sorted(retiring.items()):
            label = name.ljust(width)
            if not held.get("reported"):
                out.append(f"  {label}  not reported yet")
                continue
            running, queued = int(held.get("running") or 0), int(held.get("queued") or 0)
            reserved = int(held.get("reserved") or 0)
            text = f"  {label}  retiring: {running} running + {queued} queued"
            if reserved:
                text += f" + {reserved} moving"
            text += f" · moved {int(held.get('moved', 0))}"
            left = float(held.get("grace_left_s", 0))
            text += f" · grace left {left:.0f} s" if left > 0 else " · grace over"
            out.append(text)
    if releasing:
        out.append(f"back in the topology (hold being lifted): {', '.join(releasing)}")
    return "\n".join(out)


def render_finn(result: Mapping[str, Any], servers: int | None = None) -> str:
    decided = list(result.get("decided", []))
    k = int(result.get("tasks_per_node", 0))
    state = "complete" if result.get("complete") else "partial"
    text = (
        f"finn wave {result.get('wave_id')}: {state}, {len(decided)} servers decided, "
        f"{k} task{'s' if k != 1 else ''} each ({k * len(decided)} queued), "
        f"{result.get('messages')} messages in {1000 * float(result.get('duration_s', 0)):.1f} ms"
    )
    missing = list(result.get("missing", []))
    if missing:
        text += f"\nmissing (did not decide): {', '.join(missing)}"
    return text


def render_rebalance(result: Mapping[str, Any]) -> str:
    moves = list(result.get("moves", []))
    before = float(result.get("max_pressure_before", 0))
    after = float(result.get("max_pressure_after", 0))
    if not moves:
        text = f"nothing to move: max pressure {before:.2f} s/cpu (no move lowers it)"
    else:
        tasks = sum(int(m["tasks"]) for m in moves)
        text = (
            f"moved {tasks} task{'s' if tasks != 1 else ''} in {len(moves)} "
            f"move{'s' if len(moves) != 1 else ''}; max pressure {before:.2f} -> {after:.2f} s/cpu"
        )
        if "expected_makespan_before_s" in result:
            text += (
                f", expected makespan {float(result['expected_makespan_before_s']):.2f} -> "
                f"{float(result['expected_makespan_after_s']):.2f} s"
            )
        width = max(len(str(m["source"])) for m in moves)
        text += "".join(f"\n  {m['source']:<{width}} -> {m['target']}: {m['tasks']}" for m in moves)
    planned = sum(int(m.get("tasks", 0)) for m in result.get("planned", []))
    done = sum(int(m["tasks"]) for m in moves)
    if planned > done:
        text += f"\n{planned - done} planned task moves did not happen (tasks stayed put)"
    if result.get("missing"):
        text += f"\npartial snapshot, missing: {', '.join(result['missing'])}"
    return text


# --- commands ---------------------------------------------------------------------------------


def _add_duration(p: argparse.ArgumentParser) -> None:
    """`--duration`, as `submit` and `finn` both take it."""
    p.add_argument(
        "--duration",
        type=positive_float,
        default=None,
        metavar="S",
        help="seconds each task takes (default: the topology's task_time_s)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    add_options(p, BALANCER_URL)
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="seconds to wait for an answer (default: 30)",
    )
    add_token_file(p)


def add_token_file(p: argparse.ArgumentParser) -> None:
    """`--token-file`, read by `api_token`."""
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="file holding the balancer's API token (else $TREEWAVE_API_TOKEN, else the "
        "file named by $TREEWAVE_API_TOKEN_FILE); needed when the balancer requires it",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "status",
        help="show the tree with each server's load",
        description=textwrap.fill(
            "Run an Echo wave through the balancer and print the tree with a load bar "
            "per server (█ running, ▓ queued, ░ free cpus; + when queued work exceeds the "
            "cpus) and a summary line. A server with several parents is drawn under the first "
            "and referenced (↑) under the others.",
            88,
        ),
        formatter_class=fmt,
        epilog="examples:\n  treewave status\n  treewave status --watch 1\n"
        "  treewave status --json --balancer http://127.0.0.1:9000",
    )
    _common(p)
    p.add_argument("--json", action="store_true", help="print the /api/tree JSON")
    p.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        default=None,
        type=positive_float,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    p.set_defaults(handler=status)

    p = sub.add_parser(
        "submit",
        help="add tasks to one server",
        description=textwrap.fill("Queue COUNT tasks on one server (through the balancer).", 88),
        formatter_class=fmt,
        epilog="example:\n  treewave submit --node aurora --count 20 --duration 1.5",
    )
    _common(p)
    p.add_argument("--node", required=True, metavar="NAME", help="the server's name")
    p.add_argument("--count", required=True, type=positive_int, help="how many tasks")
    _add_duration(p)
    p.set_defaults(handler=submit)

    p = sub.add_parser(
        "finn",
        help="start a Finn wave that gives every server K tasks",
        description=textwrap.fill(
            "Run a Finn wave: every server enqueues K tasks when it decides. Exit "
            "code 1 when the wave is partial (some server did not decide in time).",
            88,
        ),
        formatter_class=fmt,
        epilog="example:\n  treewave finn --tasks-per-node 3",
    )
    _common(p)
    p.add_argument(
        "--tasks-per-node",
        type=non_negative_int,
        default=1,
        metavar="K",
        help="tasks each server enqueues (default: 1)",
    )
    _add_duration(p)
    p.set_defaults(handler=finn)

    p = sub.add_parser(
        "rebalance",
        help="rebalance queued tasks now",
        description=textwrap.fill(
            "Snapshot the tree with Echo, move queued tasks from the most pressed "
            "servers to the idlest, and report the moves and the max pressure before and after.",
            88,
        ),
        formatter_class=fmt,
        epilog="example:\n  treewave rebalance --balancer http://127.0.0.1:7999",
    )
    _common(p)
    p.set_defaults(handler=rebalance)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.balancer, args.timeout, api_token(args.token_file))


def api_token(token_file: Path | None) -> str:
    """The API token to send: `--token-file`, else $TREEWAVE_API_TOKEN, else the file in
    $TREEWAVE_API_TOKEN_FILE, else none."""
    path = token_file
    if path is None:
        env_token = os.environ.get("TREEWAVE_API_TOKEN", "").strip()
        if env_token:
            return env_token
        env_file = os.environ.get("TREEWAVE_API_TOKEN_FILE", "").strip()
        if not env_file:
            return ""
        path = Path(env_file)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        why = exc.strerror or exc
        raise CommandError(f"cannot read the API token file {path}: {why}") from None
    if not token:
        raise CommandError(f"the API token file {path} is empty")
    return token


def migration_of(client: Client) -> dict[str, Any] | None:
    """The balancer's migration state (`MigrationStatus`, as JSON), or None from a balancer
    without the topology API."""
    try:
        body = client.get("/api/topology")
    except CommandError:
        return None
    return client.read(body, TopologyStatus, "GET /api/topology").migration.model_dump(mode="json")


def policy_of(client: Client) -> str:
    """The balancing policy in force (`GET /api/status`)."""
    return client.get_as("/api/status", ClusterStatus).policy


def status_text(client: Client, *, colour: bool) -> str:
    """The tree, the policy in force, then the servers still draining (if any)."""
    tree = status_json(client, with_migration=False)
    text = f"{render_tree(tree, colour=colour)} · policy {tree['policy']}"  # on the summary line
    migration = migration_of(client)
    draining = render_migration(migration) if migration else ""
    return f"{text}\n{draining}" if draining else text


def status_json(client: Client, *, with_migration: bool = True) -> dict[str, Any]:
    """`GET /api/tree` read as a `TreeSnapshot`, with the policy in force (and the migration,
    when there is one)."""
    tree = client.get_as("/api/tree", TreeSnapshot).model_dump(mode="json")
    tree["policy"] = policy_of(client)
    migration = migration_of(client) if with_migration else None
    if migration is not None:
        tree["migration"] = migration
    return tree


def status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.watch is None:
        if args.json:
            print(json.dumps(status_json(client), indent=2))
        else:
            print(status_text(client, colour=_colour_ok()))
        return 0
    return watch(client, args.watch, as_json=args.json)


def watch(client: Client, every: float, *, as_json: bool) -> int:
    colour = _colour_ok()
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                if as_json:
                    body = json.dumps(status_json(client))
                else:
                    body = status_text(client, colour=colour)
            except CommandError as exc:
                body = f"treewave status: {exc} (retrying)"
            if as_json:
                print(body, flush=True)
            else:
                stamp = time.strftime("%H:%M:%S")
                header = f"{client.base}  every {every:g} s  {stamp}  (Ctrl-C to stop)"
                clear = "\x1b[H\x1b[2J" if tty else ""
                sys.stdout.write(f"{clear}{header}\n\n{body}\n")
                sys.stdout.flush()
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


def _colour_ok() -> bool:
    return (
        sys.stdout.isatty()
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM") not in (None, "dumb")
    )


def submit(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"node": args.node, "count": args.count}
    if args.duration is not None:
        body["duration_s"] = args.duration
    result = _client(args).post_as("/api/tasks", body, SubmitResult)
    n = result.accepted
    print(
        f"queued {n} task{'s' if n != 1 else ''} on {result.node} "
        f"({result.first_task} .. {result.last_task})"
    )
    return 0


def finn(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"tasks_per_node": args.tasks_per_node}
    if args.duration is not None:
        body["duration_s"] = args.duration
    result = _client(args).post_as("/api/finn", body, FinnResult)
    print(render_finn(result.model_dump(mode="json")))
    return 0 if result.complete else 1


def rebalance(args: argparse.Namespace) -> int:
    result = _client(args).post_as("/api/rebalance", {}, RebalanceResult)
    print(render_rebalance(result.model_dump(mode="json")))
    return 0
