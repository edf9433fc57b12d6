"""CPU per wave message through one real server process (issue 13, part 3).

    python bench/node_cpu.py                    # 20,000 Echo explores, node pinned to a core
    python bench/node_cpu.py --messages 50000 --queued 200

Starts `treewave node` for server `b` of a two-server topology (`a` -> `b`; `b` has
`--queued` tasks of an hour each, so its Echo state carries a real queue) pinned to one
core (`taskset`, when available), links to it as its parent `a` over a real WebSocket and
sends Echo explores for fresh waves: `b` has no other neighbour, so each explore is read,
parsed and validated, run through the state machine, and answered with an encoded Echo
reply (frame read -> parse -> state machine -> encode -> send). The sender stays below
the server's flood limit (paced to `--rate` frames/s) and waits for every reply.

CPU per message = the node process's CPU time (user + system, /proc) over the run, minus
what it spends idle over the same wall time (measured first), divided by the messages it
handled (each explore in and each reply out counts as one). Prints the figures and writes
bench/results/node_cpu.json.

`--floor` measures the same way a bare aiohttp WebSocket server that answers every frame
with one fixed, pre-encoded Echo reply of the same size (no parsing, no state machine, no
encoding): what reading and writing one frame costs in aiohttp and the event loop alone,
the floor under the server's figure.

`--in-process` times what the server does per explore without any socket: the same
server (its app built as `treewave node` builds it, its start-up heap settled the same
way) answers `--messages` explores in a loop (`Server.answer_frame`: flood check, parse,
state machine, trace, counts) and each answer is encoded as a link would. It is the
server's own work per explore and reply, with its caches warm.

`--awake` runs a busy loop in the idle scheduling class (SCHED_IDLE) on the server's core
while the explores run: it gets the core only when the server does not want it, so the
core never halts between two explores, and its CPU is not the server's. The difference to
a run without it is what waking an idle core costs the server on this machine.

`--profile` also samples the server with py-spy (the `bench` extra installs it) while the
explores run and splits its busy samples into the parts of the frame path (`PARTS`: frame
I/O and the event loop, parse, the state machine, the server's state, encode, metrics,
the trace recorder, logging), each shown in us per message (its share of the samples
times the CPU per message).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.support.ports import free_port
from treewave.core.messages import EchoExplore, EchoReply, Hello, ServerState, parse_message

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "node_cpu.json"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def drive(url: str, messages: int, rate: float) -> float:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str(Hello(sender="a").model_dump_json())
        start = time.monotonic()
        for i in range(messages):
            explore = EchoExplore(wave=f"w{i}", sender="a", budget_s=5.0)
            await ws.send_str(explore.model_dump_json())
            reply = await ws.receive(timeout=10)
            msg = parse_message(reply.data)
            if msg.type != "echo.reply":
                raise RuntimeError(f"unexpected answer: {reply.data[:200]}")
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        return time.monotonic() - start


PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # (part, markers of the frames that belong to it): a sample goes to the part of the
    # innermost frame on its stack that has a marker (pydantic's own frames have none, so
    # a validation is charged to whoever asked for it).
    ("parse (pydantic validate_json)", ("parse_message",)),
    ("encode (model_dump_json)", ("model_dump_json", "encode (")),
    ("server state (ledger, histogram)", ("local_state",)),
    ("trace recorder", ("core/trace.py",)),
    ("metrics (prometheus)", ("prometheus_client",)),
    ("logging", ("logging/",)),
    ("state machine (core)", ("core/",)),
    ("frame I/O, aiohttp, event loop", ("aiohttp/", "asyncio/", "selectors.py", "wire/links.py")),
    ("node shell (handle, flood, outputs)", ("node/app.py",)),
)
OTHER = "other (start-up, interpreter)"


def profile_parts(raw: Path) -> dict[str, int]:
    """Busy samples of a py-spy raw file per part of `PARTS` (idle waits left out)."""
    counts = dict.fromkeys([*(name for name, _ in PARTS), OTHER], 0)
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if "select" in frames[-1] and "selectors.py" in frames[-1]:
            continue  # waiting for the next frame
        part = next(
            (name for f in reversed(frames) for name, marks in PARTS if any(m in f for m in marks)),
            OTHER,
        )
        counts[part] += int(n)
    return counts


def start_profiler(pid: int, raw: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("--profile needs py-spy (pip install py-spy): not profiling", file=sys.stderr)
        return None
    # Non-blocking: py-spy reads the process without stopping it, so the CPU measured
    # stays the server's own.
    argv = [
        spy,
        "record",
        "-p",
        str(pid),
        "-o",
        str(raw),
        "-f",
        "raw",
        "-r",
        "250",
        "--nonblocking",
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serve_floor(port: int, reply: str) -> None:
    """The floor: a bare aiohttp WebSocket server answering every frame after the first
    (the hello) with `reply`."""
    from aiohttp import web

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=8 * 1024 * 1024)
        await ws.prepare(request)
        await ws.receive()
        async for _ in ws:
            await ws.send_str(reply)
        return ws

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def floor_reply(queued: int) -> str:
    """An Echo reply as `b` would send it with `queued` tasks queued and one running."""
    state = ServerState(
        name="b", cpus=1, running=1, queued=queued, completed=0, parents=("a",),
        echo_parent="a", running_left_s=(3599.0,), queued_s=((3600.0, queued),),
    )  # fmt: skip
    return EchoReply(wave="w0", sender="b", states=(state,), sent=1).model_dump_json()


def two_server_topology(queued: int) -> dict[str, object]:
    """`a` -> `b`, `b` with one task running and `queued` waiting, each of an hour."""
    return {
        "settings": {"task_time_s": 3600, "rebalance_interval_s": 0},
        "servers": [
            {"name": "a", "cpus": 1, "children": ["b"]},
            {"name": "b", "cpus": 1, "tasks": queued + 1},
        ],
    }


def in_process(topology: Path, messages: int) -> float:
    """Seconds of CPU per explore and its encoded reply, answered by server `b` in this
    process (see `--in-process`)."""
    from treewave.cli.services_cmd import settle_heap
    from treewave.core.messages import encode
    from treewave.node.app import SERVER_KEY, create_app
    from treewave.node.settings import NodeSettings

    # No flood limit: the loop answers far faster than any link may send.
    server = create_app(NodeSettings(name="b", topology=topology, flood_rate=1e12))[SERVER_KEY]
    server.ledger.start_next(time.monotonic())  # as `run_slots` does when the server starts
    explores = [
        EchoExplore(wave=f"w{i}", sender="a", budget_s=5.0).model_dump_json()
        for i in range(messages)
    ]
    settle_heap()
    start = time.process_time()
    for text in explores:
        for _, msg in server.answer_frame("a", text):
            encode(msg)
    return (time.process_time() - start) / messages


SPIN = (
    "import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True:\n    pass\n"
)


def keep_awake(core: int) -> subprocess.Popen[bytes] | None:
    """The `--awake` busy loop, pinned to `core`; None where it cannot be pinned."""
    if not shutil.which("taskset") or not hasattr(os, "SCHED_IDLE"):
        print("--awake needs taskset and SCHED_IDLE (Linux): not keeping the core awake")
        return None
    return subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", SPIN])


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=20_000, help="explores to send")
    ap.add_argument("--queued", type=int, default=50, help="tasks queued at the server")
    ap.add_argument("--rate", type=float, default=1500.0, help="explores per second, at most")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of idle baseline")
    ap.add_argument("--core", type=int, default=1, help="core to pin the server to")
    ap.add_argument("--label", default="", help="stored with the result (e.g. before/after)")
    ap.add_argument(
        "--floor", action="store_true", help="measure a bare aiohttp server instead (see above)"
    )
    ap.add_argument("--profile", action="store_true", help="sample the server (see above)")
    ap.add_argument(
        "--in-process", action="store_true", help="the server's own work, no sockets (see above)"
    )
    ap.add_argument(
        "--awake", action="store_true", help="keep the server's core from halting (see above)"
    )
    ap.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor, floor_reply(args.queued))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="treewave-nodecpu-"))
    topo = two_server_topology(args.queued)
    (tmp / "topology.json").write_text(json.dumps(topo), encoding="utf-8")
    if args.in_process:
        try:
            per_explore = in_process(tmp / "topology.json", args.messages)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return report_in_process(args, per_explore)
    port = free_port()
    argv = [sys.executable, "-m", "treewave.cli.main", "node", "--name", "b",
            "--topology", str(tmp / "topology.json"), "--port", str(port),
            "--log-level", "WARNING"]  # fmt: skip
    if args.floor:
        argv = [sys.executable, "-m", "bench.node_cpu", "--serve-floor", str(port),
                "--queued", str(args.queued)]  # fmt: skip
    if shutil.which("taskset"):
        argv = ["taskset", "-c", str(args.core), *argv]
    log = (tmp / "node.log").open("wb")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        import urllib.request

        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "node.log").read_text()) from None
                time.sleep(0.2)
        time.sleep(1.0)
        c0 = cpu_seconds(proc.pid)
        time.sleep(args.idle)
        idle_per_s = (cpu_seconds(proc.pid) - c0) / args.idle
        spy = start_profiler(proc.pid, tmp / "profile.raw") if args.profile else None
        spinner = keep_awake(args.core) if args.awake else None
        try:
            c1 = cpu_seconds(proc.pid)
            wall = asyncio.run(drive(f"ws://127.0.0.1:{port}/ws", args.messages, args.rate))
            busy = cpu_seconds(proc.pid) - c1
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait(10)
        parts: dict[str, int] = {}
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
            spy.wait(30)
            parts = profile_parts(tmp / "profile.raw")
        handled = 2 * args.messages
        per_msg_us = 1e6 * max(0.0, busy - idle_per_s * wall) / handled
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    print(
        f"{args.messages} explores -> {args.messages} replies in {wall:.1f} s; node CPU "
        f"{busy:.2f} s (idle {idle_per_s * 1000:.1f} ms/s); "
        f"{per_msg_us:.1f} us CPU per message ({2 * per_msg_us:.1f} us per explore+reply); "
        f"load average {load[0]:.1f}"
    )
    sampled = sum(parts.values())
    breakdown = {k: round(per_msg_us * v / sampled, 2) for k, v in parts.items()} if sampled else {}
    for name, us in breakdown.items():
        print(f"  {name:38s} {us:6.2f} us per message ({parts[name]} samples)")
    store(
        args,
        {
            "messages": handled,
            "wall_s": round(wall, 3),
            "node_cpu_s": round(busy, 3),
            "idle_cpu_per_s": round(idle_per_s, 4),
            "cpu_us_per_message": round(per_msg_us, 2),
            "queued": args.queued,
            "server": "bare aiohttp (--floor)" if args.floor else "treewave node",
            "loadavg": load,
            **({"profile_us_per_message": breakdown} if breakdown else {}),
            **({"awake": True} if args.awake else {}),
        },
    )
    return 0


def report_in_process(args: argparse.Namespace, per_explore_s: float) -> int:
    per_msg_us = 1e6 * per_explore_s / 2
    load = os.getloadavg()
    print(
        f"{args.messages} explores answered in process: {per_msg_us:.1f} us CPU per message "
        f"({2 * per_msg_us:.1f} us per explore+reply); load average {load[0]:.1f}"
    )
    store(
        args,
        {
            "messages": 2 * args.messages,
            "cpu_us_per_message": round(per_msg_us, 2),
            "queued": args.queued,
            "server": "treewave node, in process, no sockets (--in-process)",
            "loadavg": load,
        },
    )
    return 0


def store(args: argparse.Namespace, entry: dict[str, object]) -> None:
    """Add `entry` to the results file under `--label`, with the command that made it."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    command = "python -m bench.node_cpu " + " ".join(sys.argv[1:])
    results[args.label or "latest"] = {"command": command, **entry}
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
