"""A running local cluster taking a new topology (SIGHUP): reread the file; an invalid one
is reported and changes nothing. Otherwise added servers start, kept servers whose view
changed restart on the same port with their queue, the balancer gets the new topology
(`POST /api/topology`, retried while it restarts), and each removed server runs on until
the balancer reports it retired (drained, holding nothing): only then is it stopped and
its state deleted. If the balancer cannot take the topology, the change is undone."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from treewave.core.topology import TopologyError
from treewave.local.children import Child
from treewave.local.cluster import LocalCluster
from treewave.local.console import Console
from treewave.wire.topology_api import TopologyApiError
from treewave.wire.topology_change import DrainFollower, post_retrying
from treewave.wire.topology_file import load_topology

__all__ = ["POLL_TOPOLOGY_S", "POST_ATTEMPTS_S", "TopologyReload"]

POST_ATTEMPTS_S = 30.0
"""How long a reload keeps trying to reach the balancer before undoing its changes."""
POLL_TOPOLOGY_S = 1.0


@dataclass
class TopologyReload:
    cluster: LocalCluster
    topology_path: Path
    console: Console
    token: str = ""
    """The balancer's API token (when reads need it)."""
    stopping: Callable[[], bool] = lambda: False
    drain: DrainFollower = field(init=False)
    next_poll: float = 0.0

    def __post_init__(self) -> None:
        self.drain = DrainFollower(self.cluster.balancer.url, self.token)

    @property
    def retiring(self) -> set[str]:
        """Removed servers, still running (and restarted if they die) until the balancer
        reports them retired."""
        return set(self.drain.names)

    def reload(self) -> None:
        """Realise the topology file as it is now."""
        try:
            new = load_topology(self.topology_path)
        except TopologyError as exc:
            self.console.warn(f"reload: {exc.source} is not a valid topology; nothing changed:")
            for problem in exc.problems:
                self.console.warn(f"  {problem}")
            return
        cluster = self.cluster
        old = cluster.topology
        if new.to_json_data() == old.to_json_data():
            self.console.say("reload: the topology is unchanged")
            return
        change = old.diff(new)
        retiring = self.retiring
        added = [n for n in change.added if n not in retiring]
        back = [n for n in change.added if n in retiring]
        self.console.say(
            f"reload: {len(new)} servers: {len(added)} added, {len(change.removed)} removed, "
            f"{len(change.changed)} restarting with a changed view, "
            f"{len(back)} back from retiring"
        )
        snapshot = cluster.next_snapshot(new)
        started = cluster.add_servers(added, snapshot)
        # A server back from retiring runs an older topology (or alone): restart it too.
        restarted = [*change.changed, *back]
        for name in restarted:
            cluster.restart_with(name, snapshot)
        try:
            post_retrying(
                cluster.balancer.url,
                new.to_json_data(),
                token=self.token,
                within_s=POST_ATTEMPTS_S,
                stop=self.stopping,
            )
        except TopologyApiError as exc:
            self.console.warn(f"reload: {exc}")
            self.console.warn("reload: undoing it; the cluster runs the previous topology")
            self.undo(started, restarted)
            return
        cluster.topology = new
        # Restarted, the balancer comes back with the topology it adopted.
        cluster.balancer_from(snapshot)
        self.drain.forget(back)
        self.drain.follow(change.removed)
        self.next_poll = 0.0
        self.console.say(
            "reload: the balancer adopted the new topology"
            + (f"; draining {', '.join(sorted(self.retiring))}" if self.retiring else "")
        )

    def undo(self, started: list[Child], restarted: list[str]) -> None:
        """Back to the topology in force: stop the servers just added (deleting the state
        they made) and restart the changed ones from a snapshot of it."""
        cluster = self.cluster
        cluster.remove(child.name for child in started)
        snapshot = cluster.next_snapshot(cluster.topology)
        for name in restarted:
            cluster.restart_with(name, snapshot)

    def follow_drain(self) -> None:
        """Every `POLL_TOPOLOGY_S`: stop each retiring server the balancer reports retired
        (and delete its state); report the others' progress."""
        if not self.drain.names or time.monotonic() < self.next_poll:
            return
        self.next_poll = time.monotonic() + POLL_TOPOLOGY_S
        try:
            step = self.drain.poll()
        except TopologyApiError:
            return  # the balancer may be restarting: ask again later
        for name in step.retired:
            self.cluster.remove([name])
            moved = step.state.retired[name].get("moved", 0)
            self.console.say(f"server {name} retired (moved {moved} tasks): stopped, state deleted")
        for name in step.progressed:
            queued, running = step.held(name)
            self.console.say(f"server {name} draining: {queued} queued, {running} running")
