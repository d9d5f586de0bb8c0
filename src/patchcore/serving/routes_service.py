"""``/healthz`` and ``/metrics``: answered on the event loop, never queued behind scoring.

Both are ``async`` and do no blocking work, and so are their dependencies: a plain ``def`` handler
would wait for a thread of the pool that uploads and teach-in use, and an orchestrator whose
liveness probe times out restarts a service that is only busy.
"""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from .. import __version__
from .routes_dependencies import Models, ServiceMetrics

router = APIRouter(tags=["service"])


@router.get("/healthz", summary="Liveness and readiness")
async def healthz(models: Models) -> dict:
    # ``pid``: which process answered, when ``serve --workers N`` runs several.
    return {"status": "ok", "models": sorted(models), "version": __version__, "pid": os.getpid()}


router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def prometheus_metrics(metrics: ServiceMetrics, models: Models) -> PlainTextResponse:
    return PlainTextResponse(metrics.render(len(models)), media_type="text/plain; version=0.0.4; charset=utf-8")
