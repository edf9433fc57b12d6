"""Where a server's store commits: on the event loop, or on a writer thread with group commit.

The decision in docs/durability.md rests on this. A server holding QUEUE queued tasks takes
one-task submissions from CLIENTS concurrent clients; each submission is acknowledged only
once committed (synchronous=FULL). Two ways:

- `loop`: the handler applies the ledger change and commits it right there (one small
  transaction; the event loop waits for the fsync).
- `thread`: the handler hands the change to a writer thread and awaits it; the writer
  commits everything queued meanwhile in one transaction (group commit) while the loop
  goes on.

For each: acknowledged operations per second, median and p99 time to acknowledgement, and
the event loop's worst stall (how late a 1 ms ticker woke up) - what Echo waves and links
feel while submissions stream in.

    python -m bench.store_commit [--queue 100000] [--clients 1 8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from treewave.core.ledger import LedgerChanges, TaskLedger
from treewave.core.messages import Task
from treewave.node.store import TaskStore

FLAGS = {"held": False, "cpus": 4}


def prepared_store(directory: Path, queue: int) -> tuple[TaskStore, TaskLedger]:
    store = TaskStore(directory / "bench.sqlite3")
    ledger = TaskLedger(track_changes=True)
    ledger.submit([Task(id=f"q{i}", duration_s=1.0) for i in range(queue)])
    store.write_full("start", ledger, FLAGS)
    return store, ledger


class GroupWriter:
    """A writer thread: commits every change handed to it since its last commit as one
    transaction, then resolves the waiting futures."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.pending: list[tuple[LedgerChanges, Future[None]]] = []
        self.cond = threading.Condition()
        self.stopped = False
        self.commits = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def submit(self, changes: LedgerChanges) -> Future[None]:
        done: Future[None] = Future()
        with self.cond:
            self.pending.append((changes, done))
            self.cond.notify()
        return done

    def run(self) -> None:
        db = self.store.db
        while True:
            with self.cond:
                while not self.pending and not self.stopped:
                    self.cond.wait()
                if self.stopped and not self.pending:
                    return
                batch, self.pending = self.pending, []
            db.execute("BEGIN IMMEDIATE")
            for changes, _ in batch:
                self.store._write_changes(changes)  # the store's own row writes
            db.commit()
            self.commits += 1
            for _, done in batch:
                done.set_result(None)

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join()


async def ticker(stalls: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        stalls.append(time.perf_counter() - t0 - 0.001)


async def run_mode(mode: str, queue: int, clients: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store, ledger = prepared_store(Path(tmp), queue)
        writer = GroupWriter(store) if mode == "thread" else None
        latencies: list[float] = []
        stalls: list[float] = []
        stop = asyncio.Event()
        counter = 0

        async def client() -> None:
            nonlocal counter
            while not stop.is_set():
                counter += 1
                t0 = time.perf_counter()
                ledger.submit([Task(id=f"s{counter}", duration_s=1.0)])
                changes = ledger.take_changes()
                if writer is None:
                    store.apply("submit", changes, ledger, FLAGS)
                else:
                    await asyncio.wrap_future(writer.submit(changes))
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0)  # the acknowledgement goes out

        tick = asyncio.create_task(ticker(stalls, stop))
        workers = [asyncio.create_task(client()) for _ in range(clients)]
        commits_before = store.commits
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(tick, *workers)
        commits = writer.commits if writer else store.commits - commits_before
        if writer is not None:
            writer.stop()
        store.close()
    lat = sorted(latencies)
    return {
        "mode": mode,
        "queue": queue,
        "clients": clients,
        "acks_per_s": round(len(lat) / seconds, 1),
        "commits_per_s": round(commits / seconds, 1),
        "ack_median_ms": round(statistics.median(lat) * 1000, 2),
        "ack_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2),
        "loop_stall_median_ms": round(statistics.median(stalls) * 1000, 2),
        "loop_stall_max_ms": round(max(stalls) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, default=100_000, help="queued tasks (100000)")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 8], help="concurrent submitters (1 8)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (3)")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    for clients in args.clients:
        for mode in ("loop", "thread"):
            result = asyncio.run(run_mode(mode, args.queue, clients, args.seconds))
            print(json.dumps(result))


if __name__ == "__main__":
    main()
