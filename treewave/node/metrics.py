"""The server's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["NodeMetrics"]


class NodeMetrics:
    def __init__(self, server: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["server"]
        self.cpus = Gauge("treewave_node_cpus", "CPU slots", labels, registry=r).labels(server)
        self.running = Gauge(
            "treewave_node_running", "Tasks holding a CPU slot", labels, registry=r
        ).labels(server)
        self.queued = Gauge(
            "treewave_node_queued", "Tasks waiting for a slot", labels, registry=r
        ).labels(server)
        self.reserved = Gauge(
            "treewave_node_reserved",
            "Tasks reserved for an unfinished transfer",
            labels,
            registry=r,
        ).labels(server)
        self.expected_work = Gauge(
            "treewave_node_expected_work_seconds",
            "Expected seconds of work: what is left of running tasks plus the queue",
            labels,
            registry=r,
        ).labels(server)
        self.pressure = Gauge(
            "treewave_node_pressure",
            "Pressure: expected work per CPU, seconds (core.load.pressure)",
            labels,
            registry=r,
        ).labels(server)
        self.completed = Counter(
            "treewave_node_completed", "Tasks completed", labels, registry=r
        ).labels(server)
        self.transferred_in = Counter(
            "treewave_node_transferred_in", "Tasks received by transfer", labels, registry=r
        ).labels(server)
        self.transferred_out = Counter(
            "treewave_node_transferred_out", "Tasks given away by transfer", labels, registry=r
        ).labels(server)
        self.submitted = Counter(
            "treewave_node_submitted",
            "Tasks queued here by submission or Finn",
            labels,
            registry=r,
        ).labels(server)
        self.wave_messages = Counter(
            "treewave_node_wave_messages",
            "Wave messages",
            ["server", "algorithm", "direction"],
            registry=r,
        )
        # Bound once: a labels() lookup per frame costs more than the increment.
        self.wave_in = {a: self.wave_messages.labels(server, a, "in") for a in ("echo", "finn")}
        self.wave_out = {a: self.wave_messages.labels(server, a, "out") for a in ("echo", "finn")}
        self.invalid = Counter(
            "treewave_node_invalid_messages", "Frames rejected", ["server", "reason"], registry=r
        )
        self.links = Gauge(
            "treewave_node_links_up",
            "Open links to neighbours and the balancer",
            labels,
            registry=r,
        ).labels(server)
        self.server = server
