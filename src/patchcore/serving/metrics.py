"""Prometheus metrics of the inference service (request counts, latency histogram, inference gauges).

One process: the metrics live in a registry of the app's own (several apps may live in one
process, as in the tests). Several workers (``serve --workers N``): prometheus_client's
multiprocess mode, switched on by ``PROMETHEUS_MULTIPROC_DIR`` (which :func:`.server.serve` sets
to a fresh folder before the workers start): every worker writes its values there and a scrape,
whichever worker answers it, reports counters and histograms summed over the workers, the
in-flight and queue gauges summed over the live workers, and the start time of the oldest.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: prometheus_client's switch for multiprocess mode (read by it when it is imported).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """One service's metrics. ``in_flight`` and ``waiting`` are counts the service updates under
    its own lock; each change is written to its gauge."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        # In multiprocess mode metrics are not registered: a scrape collects every worker's files.
        self.registry = CollectorRegistry()
        own = None if self.multiprocess else self.registry
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry)
        self._requests = Counter("patchcore_http_requests", "HTTP requests by endpoint, method and status.",
                                 ["endpoint", "method", "status"], registry=own)
        self._latency = Histogram("patchcore_http_request_duration_seconds", "Time to answer a request.",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=own)
        self._inferences = Counter("patchcore_inferences", "Images scored, by model and outcome.",
                                   ["model", "outcome"], registry=own)
        self._in_flight_gauge = Gauge("patchcore_inferences_in_flight", "Images being scored now (decoding counts as waiting).",
                                      registry=own, multiprocess_mode="livesum")
        self._waiting_gauge = Gauge("patchcore_inference_queue", "Requests waiting for an inference slot.",
                                    registry=own, multiprocess_mode="livesum")
        self._models = Gauge("patchcore_models_loaded", "Models served.", registry=own, multiprocess_mode="livemax")
        Gauge("patchcore_start_time_seconds", "Start time of the service (Unix time).", registry=own,
              multiprocess_mode="min").set(time.time())
        self._in_flight = self._waiting = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight = value
        self._in_flight_gauge.set(value)

    @property
    def waiting(self) -> int:
        return self._waiting

    @waiting.setter
    def waiting(self, value: int) -> None:
        self._waiting = value
        self._waiting_gauge.set(value)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint, method, str(status)).inc()
        self._latency.labels(endpoint).observe(seconds)

    def count_inference(self, model: str, outcome: str) -> None:
        self._inferences.labels(model, outcome).inc()

    def render(self, models: int) -> str:
        """The Prometheus text exposition."""
        self._models.set(models)
        return generate_latest(self.registry).decode()
