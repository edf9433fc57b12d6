"""`treewave trace WAVE_ID`: a wave's events in causal order in the terminal (or a file
ShiViz opens with `--shiviz`, several waves in one), from a balancer's `/api/waves/{id}` or
from a file written by `treewave simulate --trace FILE`."""

from __future__ import annotations

import argparse
import json
import textwrap
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from treewave.cli.api_client import Client
from treewave.cli.argtypes import positive_float
from treewave.cli.client_cmd import add_token_file, api_token
from treewave.cli.errors import CommandError
from treewave.cli.settings import BALANCER_URL, add_options
from treewave.core.api import WAVE_TRACE, TraceDecide, TraceList, WaveTrace
from treewave.core.messages import describe_errors
from treewave.core.trace import shiviz_file

__all__ = ["load_traces", "register", "render_trace"]

LATEST = "latest"
ALL = "all"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "trace",
        help="print a wave's messages and decisions in causal order",
        description=textwrap.fill(
            "Print one traced wave event by event: every message (sender -> receiver, "
            "kind, each side's own clock, the vector clock at the receive) and every "
            "decision, in an order consistent with causality. WAVE_ID 'latest' is the "
            "newest traced wave. --shiviz prints a file ShiViz's 'Choose file' opens as it "
            "is (its parser and delimiter lines first); give several WAVE_IDs, or 'all', "
            "to put several waves in it, one ShiViz execution each.",
            88,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  treewave trace latest\n"
        "  treewave trace echo-1a2b3c-4 --shiviz > wave.log\n"
        "  treewave trace all --shiviz > waves.log\n"
        "  treewave simulate --nodes 30 --trace waves.json && "
        "treewave trace finn-1 --file waves.json",
    )
    p.add_argument(
        "wave_ids",
        nargs="+",
        metavar="WAVE_ID",
        help="a wave id, or 'latest'; with --shiviz several, or 'all'",
    )
    add_options(p, BALANCER_URL)
    p.add_argument(
        "--file",
        type=Path,
        default=None,
        help="read the wave from a file written by `treewave simulate --trace`",
    )
    p.add_argument("--shiviz", action="store_true", help="print a ShiViz file instead")
    p.add_argument("--json", action="store_true", help="print the trace's JSON")
    p.add_argument("--timeout", type=positive_float, default=30.0, metavar="S", help="default: 30")
    add_token_file(p)  # reads need it when the balancer runs with --token-for-reads
    p.set_defaults(handler=run)


def load_traces(wave_ids: Sequence[str], path: Path) -> list[WaveTrace]:
    """Waves from a `simulate --trace` file (`{"waves": [trace, ...]}`), in the order asked
    ('latest': the last one; 'all': every one, in the file's order)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read the trace file {path}: {exc}") from None
    waves = data.get("waves") if isinstance(data, dict) else None
    if not isinstance(waves, list) or not all(isinstance(w, dict) for w in waves):
        raise CommandError(f"{path} is not a trace file (no list of waves)")
    if not waves:
        raise CommandError(f"{path} holds no waves")
    try:
        traces = [WAVE_TRACE.validate_python(w) for w in waves]
    except ValidationError as exc:
        raise CommandError(f"{path} is not a trace file: {describe_errors(exc)}") from None
    by_id = {t.wave_id: t for t in traces}
    out: list[WaveTrace] = []
    for wave_id in wave_ids:
        if wave_id == ALL:
            out += traces
        elif wave_id == LATEST:
            out.append(traces[-1])
        elif wave_id in by_id:
            out.append(by_id[wave_id])
        else:
            ids = ", ".join(by_id)
            raise CommandError(f"unknown wave {wave_id!r} in {path} (it holds {ids})")
    return out


def _fetch(wave_ids: Sequence[str], client: Client) -> list[WaveTrace]:
    """Traces from the balancer ('latest': the newest traced wave; 'all': every traced
    wave kept whose trace is gathered, oldest first)."""
    ids: list[str] = []
    for wave_id in wave_ids:
        if wave_id in (LATEST, ALL):
            listing = client.get_as("/api/waves", TraceList)
            if not listing.waves:
                raise CommandError("the balancer has no traced waves yet (run `treewave finn`)")
            if wave_id == LATEST:
                ids.append(listing.waves[0].wave_id)
            else:
                ids += [w.wave_id for w in reversed(listing.waves) if w.ready]
        else:
            ids.append(wave_id)
    return [client.get_as("/api/waves/" + urllib.parse.quote(i, safe=""), WaveTrace) for i in ids]


def _clock(clock: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{k}:{v}" for k, v in clock.items()) + "}"


def render_trace(trace: WaveTrace) -> str:
    """The trace as text: a header, then one line per message or decision, in the order
    of their completing event. Times are each host's own clock, relative to the first."""
    events = trace.events
    starts = [e.sent for e in events if e.sent is not None]
    t0 = min(starts, default=0.0)
    state = "complete" if trace.complete else "PARTIAL"
    head = (
        f"{trace.algorithm} wave {trace.wave_id} · trace {state} · "
        f"{trace.messages} messages · {len(trace.lanes)} participants"
    )
    lines = [head]
    if trace.missing:
        lines.append(f"no trace from: {', '.join(trace.missing)}")
    if trace.wave_missing:
        lines.append(f"the wave missed: {', '.join(trace.wave_missing)}")
    width = max((len(n) for n in trace.lanes), default=8)

    def ms(at: float | None) -> str:
        return "       -" if at is None else f"{(at - t0) * 1000:8.2f}"

    lines.append(
        f"{'#':>4}  {'from':<{width}}    {'to':<{width}}  {'kind':<8}"
        f" {'sent ms':>8} {'recv ms':>8}  vector clock"
    )
    for i, e in enumerate(events, 1):
        if isinstance(e, TraceDecide):
            sets = f"  |inc|={e.inc} |ninc|={e.ninc}" if e.inc is not None else ""
            lines.append(
                f"{i:>4}  {e.from_:<{width}}    {'':<{width}}  {'DECIDES':<8}"
                f" {ms(e.sent)} {'':>8}  {_clock(e.clock)}{sets}"
            )
            continue
        extra = ""
        if e.inc is not None:
            extra = f"  |inc|={e.inc} |ninc|={e.ninc} |dec|={e.dec}"
        elif e.tree and e.kind == "explore":
            extra = "  (tree edge)"
        lost = "" if e.received is not None else "  (no receive recorded)"
        lines.append(
            f"{i:>4}  {e.from_:<{width}} -> {e.to:<{width}}  {e.kind:<8}"
            f" {ms(e.sent)} {ms(e.received)}  {_clock(e.clock)}{extra}{lost}"
        )
    return "\n".join(lines)


def as_json(trace: WaveTrace) -> dict[str, Any]:
    """The trace's JSON as the API serves it."""
    return trace.model_dump(mode="json", exclude_unset=True)


def run(args: argparse.Namespace) -> int:
    if args.shiviz and args.json:
        raise CommandError("choose one of --shiviz and --json")
    several = len(args.wave_ids) > 1 or ALL in args.wave_ids
    if several and not args.shiviz:
        raise CommandError("several waves (or 'all') go in one file only with --shiviz")
    if args.file is not None:
        traces = load_traces(args.wave_ids, args.file)
    else:
        client = Client(args.balancer, args.timeout, api_token(args.token_file))
        traces = _fetch(args.wave_ids, client)
    if args.shiviz:
        print(shiviz_file(as_json(t) for t in traces), end="")
    elif args.json:
        print(json.dumps(as_json(traces[0]), indent=2))
    else:
        print(render_trace(traces[0]))
    return 0
