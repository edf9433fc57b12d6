"""A cluster of real processes that tests can break, and a per-task-id conservation check.

Builds on `tests.support.cluster` (a state directory per server, so a restart comes back
with its queue; an environment per process for TREEWAVE_CRASH crash points) and adds what
fault tests need: SIGKILL / wait for an injected crash / restart with a different
environment, and servers that are down on purpose (ignored by readiness polling and by
the "died on its own" check at teardown).

`TaskBook` knows every task id a test created and checks, against `/api/tasks` of every
server, that each is in exactly one place and that none is lost or completed twice.
"""

from __future__ import annotations

import contextlib
import signal
import urllib.error
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.support.cluster import BALANCER, Cluster, ClusterError
from tests.support.http import get_json
from tests.support.waiting import wait_for

__all__ = [
    "BALANCER",
    "CRASH_EXIT_CODE",
    "ClusterError",
    "FaultCluster",
    "TaskBook",
    "drained",
    "echo_missing",
    "finn_missing",
    "http_error_status",
    "wait_for",
]

CRASH_EXIT_CODE = 70
"""What a server exits with at an injected crash point (node/app.py)."""


# --- processes ------------------------------------------------------------------------------


class FaultCluster(Cluster):
    """A `Cluster` whose services can be killed, crashed, frozen and restarted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.down: set[str] = set()
        """Services down on purpose right now (not polled for readiness)."""

    def running(self) -> list[str]:
        return [n for n in self.services if n not in self.held and n not in self.down]

    # --- faults ----------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """SIGKILL (kill -9) and reap."""
        svc = self.services[name]
        self.down.add(name)
        self.stopped_on_purpose.add(name)
        assert svc.proc is not None
        with contextlib.suppress(ProcessLookupError):
            svc.proc.send_signal(signal.SIGCONT)
            svc.proc.kill()
        svc.proc.wait()

    def wait_crash(self, name: str, timeout: float = 60.0) -> int:
        """Wait for `name` to exit at its injected crash point; returns its exit code."""
        svc = self.services[name]
        self.down.add(name)
        self.stopped_on_purpose.add(name)
        assert svc.proc is not None
        proc = svc.proc
        code = wait_for(f"{name} to crash", lambda: proc.poll() is not None, timeout)
        assert code
        return int(proc.returncode)

    def restart(self, name: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        """Start `name` again with the same arguments (same port and state directory),
        with `env` as its extra environment (default: none, i.e. no crash points)."""
        svc = self.services[name]
        if svc.proc is not None and svc.proc.poll() is None:
            raise AssertionError(f"{name} is still running")
        if svc.proc is not None:
            svc.proc.wait()
        svc.env = dict(env or {})
        svc.start()
        self.down.discard(name)
        self.stopped_on_purpose.discard(name)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 90.0) -> None:
        super().wait_ready(timeout)

    # --- API shortcuts -----------------------------------------------------------------------

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 60) -> Any:
        return get_json(self.balancer_url + path, method, body, timeout=timeout)

    def tree(self) -> dict[str, Any]:
        result: dict[str, Any] = self.api("/api/tree")
        return result

    def finn(self, tasks_per_node: int, duration_s: float) -> dict[str, Any]:
        body = {"tasks_per_node": tasks_per_node, "duration_s": duration_s}
        result: dict[str, Any] = self.api("/api/finn", "POST", body)
        return result

    def submit(self, node: str, count: int, duration_s: float) -> dict[str, Any]:
        body = {"node": node, "count": count, "duration_s": duration_s}
        result: dict[str, Any] = self.api("/api/tasks", "POST", body)
        return result

    def rebalance(self) -> dict[str, Any]:
        result: dict[str, Any] = self.api("/api/rebalance", "POST", {}, timeout=120)
        return result

    def node_tasks(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = get_json(self.url(name) + "/api/tasks", timeout=10)
        return result

    def node_state(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = get_json(self.url(name) + "/api/state", timeout=10)
        return result

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """`/api/tasks` of every server that is up (one after the other: not atomic)."""
        return {n: self.node_tasks(n) for n in self.names if n not in self.down}

    def balancer_status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.api("/api/status")
        return result


# --- conservation --------------------------------------------------------------------------

PLACES = ("queued", "running", "reserved", "completed")
LIVE = ("queued", "running", "completed")


@dataclass
class TaskBook:
    """Every task id a test created, and the checks of where they are."""

    created: set[str] = field(default_factory=set)
    finn_waves: dict[str, int] = field(default_factory=dict)
    """Finn wave id -> tasks per node; each server that decides creates that many tasks
    named `SERVER:WAVE:k`, found (and added to `created`) as they show up."""
    samples: int = 0

    def add_initial(self, topology: dict[str, Any]) -> None:
        """The topology's initial tasks: `NAME:init:1..tasks` on each server."""
        for s in topology["servers"]:
            self.created.update(f"{s['name']}:init:{k}" for k in range(1, s.get("tasks", 0) + 1))

    def add_submitted(self, answer: dict[str, Any]) -> list[str]:
        """The ids of one POST /api/tasks answer (`BATCH.0` .. `BATCH.(n-1)`)."""
        batch, first = answer["first_task"].rsplit(".", 1)
        batch_last, last = answer["last_task"].rsplit(".", 1)
        assert batch == batch_last
        assert int(first) == 0
        assert int(last) + 1 == answer["accepted"]
        ids = [f"{batch}.{i}" for i in range(answer["accepted"])]
        self.created.update(ids)
        return ids

    def add_finn(self, wave_id: str, tasks_per_node: int) -> None:
        self.finn_waves[wave_id] = tasks_per_node

    def check_finn(
        self, snapshot: dict[str, dict[str, Any]], wave_id: str, decided: Iterable[str]
    ) -> list[str]:
        """Every server the balancer names as decided holds exactly its share of the
        wave's tasks (somewhere in its ledger); those ids count as created from now on."""
        per_node = self.finn_waves[wave_id]
        found: Counter[str] = Counter()
        for tasks in snapshot.values():
            for place in PLACES:
                for tid in tasks[place]:
                    origin = self._finn_origin(tid)
                    if origin is not None and origin[1] == wave_id:
                        found[origin[0]] += 1
                        self.created.add(tid)
        return [
            f"{node} decided in finn wave {wave_id} but holds {found[node]} of its {per_node} tasks"
            for node in decided
            if found[node] != per_node
        ]

    def _finn_origin(self, task_id: str) -> tuple[str, str] | None:
        parts = task_id.split(":")
        if len(parts) == 3 and parts[1] in self.finn_waves:
            return parts[0], parts[1]
        return None

    def check(self, snapshot: dict[str, dict[str, Any]], final: bool = False) -> list[str]:
        """Problems with a snapshot (empty list: fine).

        Always: no id in two live places (queued/running/completed, across servers), none
        reserved twice, none completed on two servers, no unknown id, no server created
        more tasks for a Finn wave than it asked. With `final` (every server up, the
        cluster drained): nothing queued, running or reserved anywhere, every created id
        completed exactly once, and the completion counters add up to the ids created.

        A reserved id may also be live elsewhere: between `deliver` and `commit` the donor
        still holds the reservation while the recipient has the tasks (the reservation is
        only a lock; it never runs)."""
        self.samples += 1
        problems: list[str] = []
        live: dict[str, list[str]] = defaultdict(list)
        reserved: dict[str, list[str]] = defaultdict(list)
        finn_count: Counter[tuple[str, str]] = Counter()
        for node, tasks in snapshot.items():
            for place in LIVE:
                for tid in tasks[place]:
                    live[tid].append(f"{node}.{place}")
            for tid in tasks["reserved"]:
                reserved[tid].append(node)
            if len(set(tasks["completed"])) != len(tasks["completed"]):
                problems.append(f"{node} lists a completed id twice")
        for tid in {*live, *reserved}:
            origin = self._finn_origin(tid)
            if origin is not None and tid not in self.created:
                self.created.add(tid)
            if origin is not None:
                finn_count[origin] += 1
        for (node, wave), n in finn_count.items():
            if n > self.finn_waves[wave]:
                problems.append(f"{node} has {n} tasks of finn wave {wave}")
        for tid, where in live.items():
            if len(where) > 1:
                problems.append(f"{tid} is in two places: {where}")
        for tid, where in reserved.items():
            if len(where) > 1:
                problems.append(f"{tid} is reserved twice: {where}")
        unknown = sorted(set(live) - self.created) + sorted(set(reserved) - self.created)
        if unknown:
            problems.append(f"ids nobody created: {unknown[:10]}")
        if final:
            problems += self._check_final(snapshot, live, reserved)
        return problems

    def _check_final(
        self,
        snapshot: dict[str, dict[str, Any]],
        live: dict[str, list[str]],
        reserved: dict[str, list[str]],
    ) -> list[str]:
        problems = []
        if reserved:
            problems.append(f"still reserved at the end: {dict(list(reserved.items())[:10])}")
        busy = {n: (len(t["queued"]), len(t["running"])) for n, t in snapshot.items()}
        busy = {n: qr for n, qr in busy.items() if qr != (0, 0)}
        if busy:
            problems.append(f"not drained (queued, running): {busy}")
        completed = {
            tid for tid, where in live.items() if any(w.endswith(".completed") for w in where)
        }
        lost = self.created - completed
        if lost:
            problems.append(f"lost {len(lost)} tasks: {sorted(lost)[:10]}")
        total = sum(t["completed_count"] for t in snapshot.values())
        if total != len(self.created):
            problems.append(f"completed_count total {total} != {len(self.created)} created")
        return problems

    def placed(self, snapshot: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
        """Where each id is: id -> ['node.place', ...]."""
        where: dict[str, list[str]] = defaultdict(list)
        for node, tasks in snapshot.items():
            for place in PLACES:
                for tid in tasks[place]:
                    where[tid].append(f"{node}.{place}")
        return where


def echo_missing(topology: dict[str, Any], dead: Iterable[str]) -> set[str]:
    """Who an Echo cannot reach with `dead` down: the dead and every server cut off from
    the root in the undirected graph without them."""
    dead = set(dead)
    adjacent: dict[str, set[str]] = defaultdict(set)
    for s in topology["servers"]:
        for child in s.get("children", []):
            adjacent[s["name"]].add(child)
            adjacent[child].add(s["name"])
    names = [s["name"] for s in topology["servers"]]
    kids = {c for s in topology["servers"] for c in s.get("children", [])}
    root = next(n for n in names if n not in kids)
    seen: set[str] = set()
    todo = [] if root in dead else [root]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(m for m in adjacent[n] if m not in dead)
    return set(names) - seen


def finn_missing(topology: dict[str, Any], dead: Iterable[str]) -> set[str]:
    """Who cannot decide in a Finn wave with `dead` down: the dead and every server below
    one of them (a server waits for all its in-neighbours)."""
    children = {s["name"]: list(s.get("children", [])) for s in topology["servers"]}
    out: set[str] = set()
    todo = list(dead)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(children[n])
    return out


def drained(snapshot: dict[str, dict[str, Any]]) -> bool:
    return all(
        not t["queued"] and not t["running"] and not t["reserved"] for t in snapshot.values()
    )


def http_error_status(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, urllib.error.HTTPError) else None
