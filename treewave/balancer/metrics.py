"""The balancer's Prometheus metrics, including the topology as info series so
dashboards can draw the tree from Prometheus alone."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from treewave.core.api import MigrationStatus
from treewave.core.load import pressure
from treewave.core.messages import ServerState
from treewave.core.policy import expected_makespan, imbalance, loads_of, max_pressure
from treewave.core.topology import Topology

__all__ = ["BalancerMetrics"]


class BalancerMetrics:
    def __init__(self, topology: Topology) -> None:
        self.registry = r = CollectorRegistry()
        self.waves = Counter(
            "treewave_waves", "Waves finished", ["algorithm", "outcome"], registry=r
        )
        self.wave_duration = Histogram(
            "treewave_wave_duration_seconds",
            "Wave duration",
            ["algorithm"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.wave_messages = Counter(
            "treewave_wave_messages", "Messages of finished waves", ["algorithm"], registry=r
        )
        self.rebalance_runs = Counter("treewave_rebalance_runs", "Rebalancing rounds", registry=r)
        self.rebalance_moves = Counter(
            "treewave_rebalance_moves", "Moves planned by the policy", registry=r
        )
        self.tasks_moved = Counter("treewave_tasks_moved", "Tasks transferred", registry=r)
        self.transfers = Counter(
            "treewave_transfers", "Transfers by outcome", ["outcome"], registry=r
        )
        self.in_doubt = Gauge(
            "treewave_transfers_in_doubt", "Transfers whose outcome is being resolved", registry=r
        )
        self.max_pressure = Gauge(
            "treewave_max_pressure",
            "Highest pressure (expected work per CPU, seconds) in the last Echo snapshot",
            registry=r,
        )
        self.expected_makespan = Gauge(
            "treewave_expected_makespan_seconds",
            "Largest expected finish time over the servers (last Echo)",
            registry=r,
        )
        self.imbalance = Gauge(
            "treewave_imbalance",
            "Max pressure minus cluster pressure, seconds per CPU (last Echo)",
            registry=r,
        )
        self.server_pressure = Gauge(
            "treewave_server_pressure",
            "Pressure per server, expected work per CPU in seconds (last Echo)",
            ["server"],
            registry=r,
        )
        self.api_errors = Counter(
            "treewave_api_errors", "Rejected API requests", ["route", "status"], registry=r
        )
        self.invalid = Counter(
            "treewave_invalid_messages", "Frames rejected by the balancer", ["reason"], registry=r
        )
        self.topology_changes = Counter(
            "treewave_topology_changes", "Topologies adopted (POST /api/topology)", registry=r
        )
        self.migration_draining = Gauge(
            "treewave_migration_draining",
            "1 while servers that left the topology are being drained, else 0",
            registry=r,
        )
        self.retiring_servers = Gauge(
            "treewave_migration_retiring_servers", "Servers being drained", registry=r
        )
        self.retiring_tasks = Gauge(
            "treewave_migration_retiring_tasks",
            "Tasks a retiring server still holds (last report)",
            ["server", "state"],
            registry=r,
        )
        self.retired = Counter(
            "treewave_migration_retired", "Servers retired (drained, holding nothing)", registry=r
        )
        self.drain_moved = Counter(
            "treewave_migration_tasks_moved",
            "Tasks moved off retiring servers by the migration",
            registry=r,
        )
        self.server_info = Gauge(
            "treewave_topology_server_info",
            "A server of the topology",
            ["server", "cpus"],
            registry=r,
        )
        self.edge_info = Gauge(
            "treewave_topology_edge_info",
            "A parent -> child edge of the topology",
            ["id", "source", "target"],
            registry=r,
        )
        self.policy_info = Gauge(
            "treewave_balancer_policy_info",
            "The balancing policy in force (1 for its name; Grafana annotates changes)",
            ["policy"],
            registry=r,
        )
        self.show_topology(topology)

    def show_snapshot(self, states: tuple[ServerState, ...], task_time_s: float) -> None:
        """The pressure gauges from an Echo snapshot."""
        loads = loads_of(states, task_time_s)
        self.max_pressure.set(max_pressure(loads))
        self.imbalance.set(imbalance(loads))
        self.expected_makespan.set(expected_makespan(loads))
        for s in states:
            self.server_pressure.labels(s.name).set(pressure(s, task_time_s))

    def show_policy(self, name: str) -> None:
        """The policy in force (again, after a topology change)."""
        self.policy_info.clear()
        self.policy_info.labels(name).set(1)

    def show_topology(self, topology: Topology) -> None:
        """The topology's info series (again, after a change)."""
        self.server_info.clear()
        self.edge_info.clear()
        for s in topology.servers:
            self.server_info.labels(s.name, str(s.cpus)).set(1)
        for a, b in topology.edges:
            self.edge_info.labels(f"{a}->{b}", a, b).set(1)

    def show_migration(self, status: MigrationStatus) -> None:
        """The migration gauges from `Migration.status`."""
        retiring = status.retiring
        self.migration_draining.set(1 if status.state == "draining" else 0)
        self.retiring_servers.set(len(retiring))
        self.retiring_tasks.clear()
        for name, held in retiring.items():
            self.retiring_tasks.labels(name, "queued").set(held.queued or 0)
            self.retiring_tasks.labels(name, "running").set(held.running or 0)
