"""The server's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["NodeMetrics", "WaveMessageCounts"]

ALGORITHMS = ("echo", "finn")


class WaveMessageCounts(Collector):
    """`treewave_node_wave_messages_total`, counted in plain ints and read when `/metrics`
    is scraped: a prometheus `Counter` takes a lock on every increment, and a wave message
    is counted twice on the server's hottest path (once in, once out)."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.received = dict.fromkeys(ALGORITHMS, 0)
        self.sent = dict.fromkeys(ALGORITHMS, 0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "treewave_node_wave_messages",
            "Wave messages",
            labels=["server", "algorithm", "direction"],
        )
        for direction, counts in (("in", self.received), ("out", self.sent)):
            for algorithm, count in counts.items():
                family.add_metric([self.server, algorithm, direction], count)
        yield family


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
        self.wave_messages = WaveMessageCounts(server)
        r.register(self.wave_messages)
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
