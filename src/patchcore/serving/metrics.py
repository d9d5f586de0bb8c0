"""Prometheus metrics of the inference service (request counts, latency histogram, inference gauges).

One process: the metrics live in a registry of the app's own (several apps may live in one
process, as in the tests). Several workers (``serve --workers N``): prometheus_client's
multiprocess mode, switched on by ``PROMETHEUS_MULTIPROC_DIR`` (which :func:`.server.serve` sets
to a fresh folder before the workers start): every worker writes its values there and a scrape,
whichever worker answers it, reports counters and histograms summed over the workers, the
in-flight and queue gauges summed over the live workers, and the start time of the oldest.

Drift (``serve --history``): per model, over its last N scored verdicts in the history database,
the share flagged, the share its calibration expected, score quantiles, and a warning flag
(:mod:`patchcore.station.drift`); every worker computes them from the same database, and a scrape
reports the most recent value written.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

if TYPE_CHECKING:
    from ..station.drift import Drift

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
        drift = dict(registry=own, multiprocess_mode="mostrecent")
        self._drift_verdicts = Gauge("patchcore_drift_window_verdicts", "Scored verdicts in the model's drift window "
                                     "(its last N in the history database).", ["model"], **drift)
        self._drift_flagged = Gauge("patchcore_drift_flagged_share", "Share of the drift window at or above the model's "
                                    "threshold (NaN without a threshold).", ["model"], **drift)
        self._drift_expected = Gauge("patchcore_drift_expected_flagged_share", "Share of good photos the threshold was "
                                     "calibrated to flag (NaN when not calibrated at a false-positive rate).",
                                     ["model"], **drift)
        self._drift_quantiles = Gauge("patchcore_drift_score_quantile", "Score quantiles over the drift window.",
                                      ["model", "quantile"], **drift)
        self._drift_warning = Gauge("patchcore_drift_warning", "1 while the flagged share exceeds the set multiple of "
                                    "the expected share, else 0.", ["model"], **drift)

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

    def set_drift(self, model: str, drift: Drift) -> None:
        """Write a model's drift figures to their gauges (unknown figures as NaN)."""
        def value(number: float | None) -> float:
            return math.nan if number is None else float(number)

        self._drift_verdicts.labels(model).set(drift.verdicts)
        self._drift_flagged.labels(model).set(value(drift.flagged_share))
        self._drift_expected.labels(model).set(value(drift.expected_share))
        for quantile, score in drift.quantiles.items():
            self._drift_quantiles.labels(model, f"{quantile:g}").set(score)
        self._drift_warning.labels(model).set(1 if drift.warning else 0)

    def render(self, models: int) -> str:
        """The Prometheus text exposition."""
        self._models.set(models)
        return generate_latest(self.registry).decode()
