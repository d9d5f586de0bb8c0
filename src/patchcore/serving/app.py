"""The HTTP inference service: a JSON API, a web page and Prometheus metrics over saved models.

Build the app with :func:`create_app` (for tests or another ASGI server); run it with
:func:`patchcore.serving.server.serve` (``patchcore serve MODEL_DIR``).

Hardening, in the order a request meets it: the body limit (:mod:`.guard`); only PNG, JPEG, BMP,
TIFF and WebP are decoded, with the image size checked from the header before any pixel is
decoded (decompression bombs: 413), and so is the size the model's resize would make of it;
decoder failures are 422 with a message, never 500; inference slots and a bounded wait
(:mod:`.inference`). Every error body is JSON: ``{"error": "..."}``.

The routes live in routers (``routes_service``: health and metrics; ``routes_models``;
``routes_scoring``: predict; ``routes_teach_in``; ``routes_history``: the History view's review,
teach-in queue and drift; ``routes_page``: the web page); their shared
state is on ``app.state`` and reaches them through the dependencies of ``routes_dependencies``.
This module only wires them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Mapping, Sequence

from PIL import Image

from .. import __version__
from ..station.drift import DriftSettings
from .guard import RequestGuard, ServiceError
from .inference import InferenceRunner, default_slots
from .metrics import Metrics
from .models import load_models
from .teach_in import DEFAULT_MAX_IMAGES, DEFAULT_MAX_MEGAPIXELS, TeachInPolicy
from .teach_tokens import TeachTokens

logger = logging.getLogger("patchcore.service")

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest decoded image accepted (width x height): 40 megapixels, below Pillow's own bomb limit.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: Largest input the network may be fed (a model that keeps photos at their own size sees them whole).
DEFAULT_MAX_INPUT_PIXELS = 2048 * 2048
#: Heat maps, overlays and masks longer than this on a side are scaled down for the response.
DEFAULT_MAX_MAP_SIDE = 2048
DEFAULT_DRIFT = DriftSettings()
#: Room for the multipart envelope around a file of ``max_upload_bytes``.
MULTIPART_OVERHEAD = 64 * 1024


def create_app(
    model_dirs: Mapping[str, str | os.PathLike],
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    max_map_side: int = DEFAULT_MAX_MAP_SIDE,
    inference_slots: int | None = None,
    max_queue: int = 64,
    threads: int | None = None,
    teach_token_file: str | os.PathLike | None = None,
    allowed_origins: Sequence[str] = (),
    teach_max_images: int = DEFAULT_MAX_IMAGES,
    teach_max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    history_url: str | os.PathLike | None = None,
    station_folders: Sequence[str | os.PathLike] = (),
    drift_window: int = DEFAULT_DRIFT.window,
    drift_multiple: float = DEFAULT_DRIFT.warn_multiple,
):
    """The FastAPI app serving ``{name: model directory}``; each model is loaded once, here.

    ``inference_slots`` (default: CPU cores / ``threads``, at least 1) bounds how many images are
    scored at once (each decoded just before, in a small pool of its own); a request that finds no
    free slot waits, unless ``max_queue`` requests already wait: then it gets 503. ``threads``:
    CPU threads of each model's network.
    ``teach_token_file``: the teach-in tokens (:mod:`.teach_tokens`); without one, teach-in and
    rollback are off. ``allowed_origins``: web origins besides the service's own whose pages may
    teach (a reverse proxy's public address, when it rewrites ``Host``). ``teach_max_images`` and
    ``teach_max_megapixels`` bound one teach-in request. ``history_url``: a history database
    (:mod:`patchcore.station.history`: a SQLite file or ``postgresql://...``) in which every scored
    request is recorded with source ``service``, by a writer thread, so that recording never holds
    up an answer (``app.state.history``: the :class:`~patchcore.station.writer.HistoryWriter`), and
    which the History view reads (:mod:`.routes_history`). ``station_folders``: the folders whose
    files (photos, overlays, masks, evidence crops) the History view may serve and teach from
    (default: the SQLite database's folder). ``drift_window``, ``drift_multiple``: drift is watched
    over each model's last ``drift_window`` scored verdicts, warning when the flagged share exceeds
    ``drift_multiple`` times the calibrated false-positive rate (:mod:`patchcore.station.drift`).
    """
    # The web stack is imported here, so that importing this module (the CLI does) stays light.
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import routes_history, routes_models, routes_page, routes_scoring, routes_service, routes_teach_in
    from .routes_dependencies import Limits

    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    if max_image_pixels > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"max_image_pixels must not exceed Pillow's MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})")
    models = load_models(model_dirs, threads)
    metrics = Metrics()
    runner = InferenceRunner(metrics, inference_slots if inference_slots is not None else default_slots(threads), max_queue,
                             max_image_pixels, max_input_pixels, max_map_side)

    drift = DriftSettings(window=drift_window, warn_multiple=drift_multiple)
    history = _open_history(history_url)
    app = FastAPI(title="patchcore", version=__version__, lifespan=_lifespan,
                  description="PatchCore anomaly detection: score images, get anomaly heat maps and masks.")
    app.state.history = history
    app.state.station = None if history is None else routes_history.StationView.open(history.history, station_folders, drift)
    app.state.models = models
    app.state.metrics = metrics
    app.state.runner = runner
    app.state.limits = Limits(max_upload_bytes=max_upload_bytes)
    if teach_max_images < 1 or teach_max_megapixels <= 0:
        raise ValueError("teach_max_images and teach_max_megapixels must be positive")
    app.state.teach_in = TeachInPolicy(
        TeachTokens(teach_token_file) if teach_token_file is not None else None,
        frozenset(origin.rstrip("/").lower() for origin in allowed_origins), teach_max_images, teach_max_megapixels)

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    for module in (routes_service, routes_models, routes_scoring, routes_teach_in, routes_history, routes_page):
        app.include_router(module.router)
    # Outermost: the guard sees every request, including those refused before routing.
    app.add_middleware(RequestGuard, max_body_bytes=max_upload_bytes + MULTIPART_OVERHEAD,
                       upload_limit=max_upload_bytes, metrics=metrics)
    return app


def _open_history(history_url: str | os.PathLike | None):
    """The writer of the service's verdicts into the history database, or ``None`` without one."""
    if history_url is None:
        return None
    from ..station.history import History
    from ..station.writer import HistoryWriter

    history = History(history_url)
    logger.info("recording every scored request in %s", history.name)
    return HistoryWriter(history, on_problem=lambda message: logger.warning("history: %s", message))


@contextlib.asynccontextmanager
async def _lifespan(app):
    """With a history database: refresh the drift gauges while serving. On shutdown, commit the
    verdicts still queued for the history database."""
    from .routes_history import DriftRefresher

    station = getattr(app.state, "station", None)
    refresher = None if station is None else DriftRefresher(station, app.state.models, app.state.metrics).start()
    yield
    if refresher is not None:
        refresher.stop()
    writer = getattr(app.state, "history", None)
    if writer is not None:
        writer.close()
        writer.history.close()


def _error(status: int, message: str, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _service_error(request, exc: ServiceError):
    return _error(exc.status, exc.message, exc.headers)


async def _http_error(request, exc):
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request, exc):
    problems = "; ".join(
        f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg', '')}" for item in exc.errors()
    )
    return _error(422, f"invalid request: {problems}")


async def _unexpected(request, exc: Exception):
    logger.exception("unexpected error answering %s %s", request.method, request.url.path)
    return _error(500, "internal error; see the service log")
