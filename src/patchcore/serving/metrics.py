"""Prometheus metrics of the inference service (request counts, latency histogram, inference gauges)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One service's metrics, in a registry of its own (several apps may live in one process).

    ``in_flight`` and ``waiting`` are plain counters the service updates under its own lock; the
    gauges read them when scraped.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.in_flight = 0
        self.waiting = 0
        self._requests = Counter("patchcore_http_requests", "HTTP requests by endpoint, method and status.",
                                 ["endpoint", "method", "status"], registry=self.registry)
        self._latency = Histogram("patchcore_http_request_duration_seconds", "Time to answer a request.",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._inferences = Counter("patchcore_inferences", "Images scored, by model and outcome.",
                                   ["model", "outcome"], registry=self.registry)
        Gauge("patchcore_inferences_in_flight", "Images being decoded or scored now.",
              registry=self.registry).set_function(lambda: self.in_flight)
        Gauge("patchcore_inference_queue", "Requests waiting for an inference slot.",
              registry=self.registry).set_function(lambda: self.waiting)
        self._models = Gauge("patchcore_models_loaded", "Models served.", registry=self.registry)
        Gauge("patchcore_start_time_seconds", "Start time of the service (Unix time).", registry=self.registry).set(time.time())

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint, method, str(status)).inc()
        self._latency.labels(endpoint).observe(seconds)

    def count_inference(self, model: str, outcome: str) -> None:
        self._inferences.labels(model, outcome).inc()

    def render(self, models: int) -> str:
        """The Prometheus text exposition."""
        self._models.set(models)
        return generate_latest(self.registry).decode()
