"""`treewave trace WAVE_ID`: a wave's events in causal order in the terminal (or the
ShiViz log with `--shiviz`), from a balancer's `/api/waves/{id}` or from a file written by
`treewave simulate --trace FILE`."""

from __future__ import annotations

import argparse
import json
import textwrap
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from treewave.cli.argtypes import positive_float
from treewave.cli.client_cmd import Client, add_token_file, api_token
from treewave.cli.errors import CommandError
from treewave.cli.settings import BALANCER_URL, add_options
from treewave.core.trace import shiviz_log

__all__ = ["load_trace", "register", "render_trace"]

LATEST = "latest"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "trace",
        help="print a wave's messages and decisions in causal order",
        description=textwrap.fill(
            "Print one traced wave event by event: every message (sender -> receiver, "
            "kind, each side's own clock, the vector clock at the receive) and every "
            "decision, in an order consistent with causality. WAVE_ID 'latest' is the "
            "newest traced wave. --shiviz prints the log ShiViz opens with its default "
            "parser.",
            88,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  treewave trace latest\n"
        "  treewave trace echo-1a2b3c-4 --shiviz > wave.log\n"
        "  treewave simulate --nodes 30 --trace waves.json && "
        "treewave trace finn-1 --file waves.json",
    )
    p.add_argument("wave_id", metavar="WAVE_ID", help="a wave id, or 'latest'")
    add_options(p, BALANCER_URL)
    p.add_argument(
        "--file",
        type=Path,
        default=None,
        help="read the wave from a file written by `treewave simulate --trace`",
    )
    p.add_argument("--shiviz", action="store_true", help="print the ShiViz log instead")
    p.add_argument("--json", action="store_true", help="print the trace's JSON")
    p.add_argument("--timeout", type=positive_float, default=30.0, metavar="S", help="default: 30")
    add_token_file(p)  # reads need it when the balancer runs with --token-for-reads
    p.set_defaults(handler=run)


def load_trace(wave_id: str, path: Path) -> dict[str, Any]:
    """One wave from a `simulate --trace` file (`{"waves": [trace, ...]}`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read the trace file {path}: {exc}") from None
    waves = data.get("waves") if isinstance(data, dict) else None
    if not isinstance(waves, list) or not all(isinstance(w, dict) for w in waves):
        raise CommandError(f"{path} is not a trace file (no list of waves)")
    if not waves:
        raise CommandError(f"{path} holds no waves")
    if wave_id == LATEST:
        return dict(waves[-1])
    for w in waves:
        if w.get("wave_id") == wave_id:
            return dict(w)
    ids = ", ".join(str(w.get("wave_id")) for w in waves)
    raise CommandError(f"unknown wave {wave_id!r} in {path} (it holds {ids})")


def _fetch(wave_id: str, client: Client) -> dict[str, Any]:
    if wave_id == LATEST:
        listing = client.get("/api/waves")
        waves = listing.get("waves") or []
        if not waves:
            raise CommandError("the balancer has no traced waves yet (run `treewave finn`)")
        wave_id = str(waves[0]["wave_id"])
    trace: dict[str, Any] = client.get("/api/waves/" + urllib.parse.quote(wave_id, safe=""))
    return trace


def _clock(clock: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{k}:{v}" for k, v in clock.items()) + "}"


def render_trace(trace: Mapping[str, Any]) -> str:
    """The trace as text: a header, then one line per message or decision, in the order
    of their completing event. Times are each host's own clock, relative to the first."""
    events = trace["events"]
    starts = [e["sent"] for e in events if e.get("sent") is not None]
    t0 = min(starts, default=0.0)
    state = "complete" if trace["complete"] else "PARTIAL"
    head = (
        f"{trace['algorithm']} wave {trace['wave_id']} · trace {state} · "
        f"{trace['messages']} messages · {len(trace['lanes'])} participants"
    )
    lines = [head]
    if trace.get("missing"):
        lines.append(f"no trace from: {', '.join(trace['missing'])}")
    if trace.get("wave_missing"):
        lines.append(f"the wave missed: {', '.join(trace['wave_missing'])}")
    width = max((len(n) for n in trace["lanes"]), default=8)

    def ms(at: float | None) -> str:
        return "       -" if at is None else f"{(at - t0) * 1000:8.2f}"

    lines.append(
        f"{'#':>4}  {'from':<{width}}    {'to':<{width}}  {'kind':<8}"
        f" {'sent ms':>8} {'recv ms':>8}  vector clock"
    )
    for i, e in enumerate(events, 1):
        if e["kind"] == "decide":
            sets = f"  |inc|={e['inc']} |ninc|={e['ninc']}" if "inc" in e else ""
            lines.append(
                f"{i:>4}  {e['from']:<{width}}    {'':<{width}}  {'DECIDES':<8}"
                f" {ms(e['sent'])} {'':>8}  {_clock(e['clock'])}{sets}"
            )
            continue
        extra = ""
        if "inc" in e:
            extra = f"  |inc|={e['inc']} |ninc|={e['ninc']} |dec|={e['dec']}"
        elif e.get("tree") and e["kind"] == "explore":
            extra = "  (tree edge)"
        lost = "" if e["received"] is not None else "  (no receive recorded)"
        lines.append(
            f"{i:>4}  {e['from']:<{width}} -> {e['to']:<{width}}  {e['kind']:<8}"
            f" {ms(e['sent'])} {ms(e['received'])}  {_clock(e['clock'])}{extra}{lost}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.shiviz and args.json:
        raise CommandError("choose one of --shiviz and --json")
    if args.file is not None:
        trace = load_trace(args.wave_id, args.file)
    else:
        client = Client(args.balancer, args.timeout, api_token(args.token_file))
        trace = _fetch(args.wave_id, client)
    if args.shiviz:
        print(shiviz_log(trace), end="")
    elif args.json:
        print(json.dumps(trace, indent=2))
    else:
        print(render_trace(trace))
    return 0
