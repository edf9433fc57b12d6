"""Reading counters from a Prometheus exposition (a service's `/metrics` text)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["counter_by", "counter_totals"]


def counter_totals(text: str, family: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The `_total` samples of the counter `family`, keyed by the values of `labels`."""
    return {
        tuple(sample.labels[label] for label in labels): sample.value
        for metric in text_string_to_metric_families(text)
        if metric.name == family
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def counter_by(text: str, family: str, label: str) -> dict[str, float]:
    """The `_total` samples of the counter `family`, keyed by the value of one label."""
    return {key: value for (key,), value in counter_totals(text, family, label).items()}
