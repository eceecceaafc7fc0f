"""Prometheus metrics of the agent: its calls, their latency, the verdicts and the models' states.

Each agent has its own `CollectorRegistry` (several agents can live in one process, as in the
tests). Calls are counted by `service._rpc`; the models' states and queues are read from the
model registry when Prometheus scrapes, so they cannot drift from what DescribeModel says.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from lookout_edge.protocol import pb2

from .models import ModelRegistry

# The `model` label of a call naming no deployed model: clients cannot grow the label set.
UNKNOWN_MODEL = "(unknown)"
# Longer names of deployed models are cut to this many characters in labels.
MODEL_LABEL_CHARS = 100
# 1 ms to 10 s: an inference takes milliseconds; StopModel waits for the calls in flight.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """The agent's metrics, in a registry of their own."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "lookout_edge_requests",
            "Edge Agent API calls, by method, model and gRPC status code",
            ["method", "model", "code"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "lookout_edge_request_duration_seconds",
            "Time the agent took to answer an Edge Agent API call",
            ["method", "model"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._anomalous = Counter(
            "lookout_edge_anomalous",
            "DetectAnomalies verdicts that were anomalous",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(_ModelCollector(models))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def model_label(self, name: str) -> str:
        """`name` as a label: "" for none, UNKNOWN_MODEL unless it is a deployed model's."""
        if not name:
            return ""
        return _short(name) if self.models.knows(name) else UNKNOWN_MODEL

    def observe_call(self, method: str, name: str, code: grpc.StatusCode, seconds: float) -> None:
        model = self.model_label(name)
        self._requests.labels(method, model, code.name).inc()
        self._duration.labels(method, model).observe(seconds)

    def count_anomalous(self, name: str) -> None:
        self._anomalous.labels(self.model_label(name)).inc()


def _short(name: str) -> str:
    return name[:MODEL_LABEL_CHARS]


class _ModelCollector(Collector):
    """The models' states and queue depths, read from the model registry at scrape time."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "lookout_edge_model_state",
            "1 for the model's current state, 0 for the others",
            labels=["model", "state"],
        )
        queue = GaugeMetricFamily(
            "lookout_edge_queue_depth",
            "Calls admitted by the model, running or waiting for their turn",
            labels=["model"],
        )
        for info in self.models.snapshot():
            model = _short(info.name)
            for name, value in pb2.ModelStatus.items():
                state.add_metric([model, name], 1.0 if info.status == value else 0.0)
            queue.add_metric([model], info.in_flight)
        yield state
        yield queue


class MetricsServer:
    """prometheus_client's HTTP server for one registry, at http://HOST:PORT/metrics."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, host, registry=registry)

    @property
    def port(self) -> int:
        """The port served (the one chosen by the system when asked for port 0)."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and close the listening socket (takes up to half a second)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
