"""Prometheus metrics on the dashboard's `/metrics`, in a registry of the daemon's own.

Counters are read from the status counters when Prometheus scrapes (nothing is added to the
camera path); only the latency histogram is observed per inference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "lookout_edge_camera"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

StatusSource = Callable[[], dict[str, Any]]


class _StatusCollector(Collector):
    def __init__(self, status: StatusSource) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        frames = CounterMetricFamily(f"{PREFIX}_frames", "Frames decoded or read.", labels=["camera"])
        inferences = CounterMetricFamily(
            f"{PREFIX}_inferences", "Inferences by verdict.", labels=["camera", "verdict"]
        )
        errors = CounterMetricFamily(
            f"{PREFIX}_errors", "Failed frames, files, decodes and agent calls.", labels=["camera"]
        )
        reconnects = CounterMetricFamily(f"{PREFIX}_reconnects", "Stream reopenings.", labels=["camera"])
        connected = GaugeMetricFamily(
            f"{PREFIX}_connected", "1 while the source delivers.", labels=["camera"]
        )
        for name, counts in status["cameras"].items():
            frames.add_metric([name], counts["frames"])
            inferences.add_metric([name, "anomaly"], counts["anomalies"])
            inferences.add_metric([name, "normal"], counts["inferences"] - counts["anomalies"])
            errors.add_metric([name], counts["errors"])
            reconnects.add_metric([name], counts["reconnects"])
            connected.add_metric([name], int(counts["connected"]))
        yield from (frames, inferences, errors, reconnects, connected)
        labels = ["sink"]
        delivered = CounterMetricFamily(f"{PREFIX}_sink_delivered", "Events delivered.", labels=labels)
        failures = CounterMetricFamily(f"{PREFIX}_sink_failures", "Failed writes or sends.", labels=labels)
        depth = GaugeMetricFamily(f"{PREFIX}_spool_depth", "Events waiting in the spool.", labels=labels)
        dropped = CounterMetricFamily(
            f"{PREFIX}_spool_dropped", "Events dropped from a full spool.", labels=labels
        )
        for name, counts in status["sinks"].items():
            delivered.add_metric([name], counts["delivered"])
            failures.add_metric([name], counts["failures"])
            if "pending" in counts:
                depth.add_metric([name], counts["pending"])
                dropped.add_metric([name], counts["dropped"])
        yield from (delivered, failures, depth, dropped)
        captured = CounterMetricFamily(
            f"{PREFIX}_captured", "Frames saved by the capture rules.", labels=["camera"]
        )
        for name, counts in status.get("capture", {}).items():
            captured.add_metric([name], counts["saved"])
        yield captured


class Metrics:
    def __init__(self, status: StatusSource) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatusCollector(status))
        self._latency = Histogram(
            f"{PREFIX}_latency_seconds",
            "Capture to result, per inference.",
            ["camera"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )

    def observe_latency(self, camera: str, milliseconds: float) -> None:
        self._latency.labels(camera).observe(milliseconds / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
