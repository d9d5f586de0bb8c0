"""HTTP inference service: a JSON API, a web page and Prometheus metrics over saved models.

Start it with :func:`serve` (or ``patchcore serve MODEL_DIR``); build the app for tests or for another
ASGI server with :func:`create_app`.

Hardening, in the order a request meets it:

- the body is limited to ``max_upload_bytes``: a larger ``Content-Length`` is refused (413) before a
  byte is read, and the bytes are counted while they arrive, so a missing or lying header does not help;
- only PNG, JPEG, BMP, TIFF and WebP are decoded; the image size in the header is checked against
  ``max_image_pixels`` before any pixel is decoded (decompression bombs: 413), and so is the size the
  model's resize would make of it (extreme aspect ratios);
- any decoder failure (truncated, corrupt, not an image) is a 422 with a message, never a 500;
- at most ``inference_slots`` images are decoded and scored at once (memory stays bounded), and when
  more than ``max_queue`` requests wait for a slot, new ones get 503 with ``Retry-After``.

Every error body is JSON: ``{"error": "..."}``.
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` class of the
# endpoints defined inside create_app (fastapi is imported there, so the CLI need not import it).
import argparse
import base64
import io
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from . import __version__
from .errors import ImageLoadError, ModelFormatError
from .images import to_rgb
from .model import PatchCore
from .overlay import colourise, heat_map_overlay
from .persistence import MANIFEST, read_manifest
from .service_metrics import Metrics

logger = logging.getLogger("patchcore.service")

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest decoded image accepted (width x height): 40 megapixels, below Pillow's own bomb limit.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: Largest image the network may be fed (a model saved without resize/crop sees images at full size).
DEFAULT_MAX_INPUT_PIXELS = 2048 * 2048
#: Heat maps, overlays and masks longer than this on a side are scaled down for the response.
DEFAULT_MAX_MAP_SIDE = 2048
#: Formats decoded from uploads; anything else is refused without trying other Pillow plugins.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
#: Room for the multipart envelope around a file of ``max_upload_bytes``.
MULTIPART_OVERHEAD = 64 * 1024

_STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
#: For the web page only (FastAPI's /docs loads Swagger UI from a CDN with inline script).
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)


# -- errors -------------------------------------------------------------------------------------


class ServiceError(Exception):
    """An error answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class UploadTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload is larger than the limit of {limit} bytes ({limit / 2**20:.1f} MiB)")


# -- model discovery ----------------------------------------------------------------------------


def discover_models(model_dir: str | os.PathLike) -> dict[str, Path]:
    """``{name: directory}`` for one model directory (named after its folder) or a folder of them."""
    path = Path(model_dir)
    if (path / MANIFEST).is_file():
        return {path.resolve().name: path}
    if not path.is_dir():
        raise ModelFormatError(f"{path}: model directory not found")
    found = {sub.name: sub for sub in sorted(path.iterdir()) if sub.is_dir() and (sub / MANIFEST).is_file()}
    if not found:
        raise ModelFormatError(f"{path}: neither a patchcore model directory nor a folder of them (no {MANIFEST} found)")
    return found


@dataclass
class ServedModel:
    name: str
    directory: Path
    model: PatchCore
    manifest: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        value = getattr(self.model, "threshold_", None)
        return None if value is None else float(value)

    @property
    def pixel_threshold(self) -> float | None:
        value = getattr(self.model, "pixel_threshold_", None)
        return self.threshold if value is None else float(value)

    def describe(self) -> dict[str, Any]:
        params = self.model.get_params()
        return {
            "name": self.name,
            "backbone": self.model.backbone,
            "layers": list(self.model.backbone_spec_.layers),
            "memory_bank_size": int(self.model.memory_bank_.shape[0]),
            "feature_dim": int(self.model.memory_bank_.shape[1]),
            "threshold": self.threshold,
            "pixel_threshold": getattr(self.model, "pixel_threshold_", None),
            "threshold_source": getattr(self.model, "threshold_source_", None),
            "format_version": self.manifest.get("format_version"),
            "patchcore_version": self.manifest.get("patchcore_version"),
            "saved_at": self.manifest.get("saved_at"),
            "resize": params.get("resize"),
            "crop": params.get("crop"),
        }


def load_models(model_dirs: Mapping[str, str | os.PathLike]) -> dict[str, ServedModel]:
    """Load each model once; a damaged or altered model stops start-up with a :class:`ModelFormatError`."""
    if not model_dirs:
        raise ValueError("no models to serve")
    served = {}
    for name, directory in model_dirs.items():
        if not name or "/" in name:
            raise ValueError(f"invalid model name {name!r}")
        directory = Path(directory)
        manifest = read_manifest(directory)
        model = PatchCore.load(directory)
        model.progress = False
        served[name] = ServedModel(name, directory, model, manifest)
        logger.info("loaded model %r from %s (memory bank %s)", name, directory, model.memory_bank_.shape)
    return served


# -- decoding -----------------------------------------------------------------------------------


def read_image_bytes(
    data: bytes, name: str = "<upload>", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode uploaded bytes to an RGB image; every failure is an :class:`ImageLoadError`.

    The size declared in the header is checked against ``max_pixels`` (which should stay below
    Pillow's ``MAX_IMAGE_PIXELS``) before any pixel data is decoded, so a decompression bomb costs
    nothing. Truncated files are errors (Pillow's ``LOAD_TRUNCATED_IMAGES`` is left off).
    """
    if not data:
        raise ImageLoadError(name, "empty upload (zero bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as opened:
            width, height = opened.size
            if width < 1 or height < 1:
                raise ImageLoadError(name, "image has no pixels")
            if width * height > max_pixels:
                raise _TooManyPixels(name, width, height, max_pixels)
            opened.load()
            if opened.width * opened.height > max_pixels:  # some formats settle their size on load
                raise _TooManyPixels(name, opened.width, opened.height, max_pixels)
            image = to_rgb(opened)
            image.load()
            return image.copy() if image is opened else image
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _TooManyPixels(name, 0, 0, max_pixels, str(exc)) from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(
            name, f"not an image, or not one of the accepted formats ({', '.join(UPLOAD_FORMATS)})"
        ) from None
    except MemoryError:
        raise _TooManyPixels(name, 0, 0, max_pixels, "out of memory while decoding") from None
    except Exception as exc:  # decoders raise many kinds on hostile input; all mean "bad image"
        raise ImageLoadError(name, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None


class _TooManyPixels(ImageLoadError):
    def __init__(self, name: str, width: int, height: int, limit: int, detail: str = "") -> None:
        size = f"{width}x{height} pixels " if width else ""
        super().__init__(name, f"image {size}is too large to decode safely (limit {limit} pixels){': ' + detail if detail else ''}")


def _network_input_pixels(model: PatchCore, width: int, height: int) -> tuple[int, int]:
    """Pixels of the resized image and of the network input that the model's transform would make."""
    transform = model.transform_
    if transform.resize is not None:
        scale = transform.resize / min(width, height)
        resized = max(1, round(width * scale)) * max(1, round(height * scale))
    else:
        resized = width * height
    return resized, (transform.crop**2 if transform.crop is not None else resized)


def _decision(prediction, threshold: float | None) -> bool | None:
    """The model's own ``is_anomalous``, or ``score >= threshold`` when it set none."""
    decided = getattr(prediction, "is_anomalous", None)
    if decided is None and threshold is not None:
        decided = prediction.score >= threshold
    return None if decided is None else bool(decided)


def _png_base64(array: np.ndarray, mode: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- ASGI guard: body limit, security headers, metrics ------------------------------------------


class _Guard:
    """Pure ASGI middleware: refuses oversized bodies early, counts bytes as they arrive,
    adds security headers and records request metrics by route template."""

    def __init__(self, app, max_body_bytes: int, upload_limit: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_limit = upload_limit
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in _SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            length = None
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        await _send_json(send_wrapper, 400, {"error": "invalid Content-Length header"})
                        return
            if length is not None and length > self.max_body_bytes:
                await _send_json(send_wrapper, 413, {"error": str(UploadTooLarge(self.upload_limit))})
                return
            received = 0

            async def receive_wrapper():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise UploadTooLarge(self.upload_limit)
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(endpoint, scope.get("method", "?"), status_holder["status"], time.perf_counter() - started)


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": payload})


# -- the app ------------------------------------------------------------------------------------


def _default_slots() -> int:
    import torch

    return max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: a multipart form with field `file`, or the raw bytes with an image/* "
                       "or application/octet-stream Content-Type. PNG, JPEG, BMP, TIFF or WebP; 8- or 16-bit, "
                       "grayscale, RGB or RGBA.",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def create_app(
    model_dirs: Mapping[str, str | os.PathLike],
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    max_map_side: int = DEFAULT_MAX_MAP_SIDE,
    inference_slots: int | None = None,
    max_queue: int = 64,
):
    """The FastAPI app serving ``{name: model directory}``; each model is loaded once, here.

    ``inference_slots`` (default: CPU cores / torch threads, at least 1) bounds how many images are
    decoded and scored at once; beyond ``max_queue`` waiting requests, new ones get 503.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    if max_image_pixels > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"max_image_pixels must not exceed Pillow's MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})")
    models = load_models(model_dirs)
    slots = inference_slots if inference_slots is not None else _default_slots()
    if slots < 1:
        raise ValueError(f"inference_slots must be at least 1, got {slots}")
    semaphore = threading.BoundedSemaphore(slots)
    # The network runs on these few threads only: every thread that calls into torch keeps its own
    # OpenMP team and oneDNN scratch memory, so running it on the web server's many pool threads
    # made the service's memory grow with the number of clients (load test: 1.1 GiB for 50).
    inference_pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="patchcore-inference")
    queue_lock = threading.Lock()
    metrics = Metrics()

    app = FastAPI(
        title="patchcore",
        version=__version__,
        description="PatchCore anomaly detection: score images, get anomaly heat maps and masks.",
    )
    app.state.models = models
    app.state.metrics = metrics
    app.state.max_upload_bytes = max_upload_bytes

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg', '')}" for item in exc.errors()
        )
        return error(422, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error(500, "internal error; see the service log")

    # -- endpoints ---------------------------------------------------------------------------

    @app.get("/healthz", tags=["service"], summary="Liveness and readiness")
    def healthz() -> dict:
        return {"status": "ok", "models": sorted(models), "version": __version__}

    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(len(models)), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", tags=["models"], summary="The models served")
    def list_models() -> dict:
        return {"models": [models[name].describe() for name in sorted(models)]}

    @app.get("/v1/models/{name}", tags=["models"], summary="One model")
    def get_model(name: str) -> dict:
        return _served(name).describe()

    def _served(name: str) -> ServedModel:
        if name not in models:
            raise ServiceError(404, f"unknown model {name!r}; served: {', '.join(sorted(models))}")
        return models[name]

    async def _read_upload(request: Request) -> tuple[bytes, str]:
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if media == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=16)
            try:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise ServiceError(422, "the multipart form needs a field 'file' holding the image")
                data = await upload.read(max_upload_bytes + 1)
                name = upload.filename or "<upload>"
            finally:
                await form.close()
        elif media in ("", "application/octet-stream") or media.startswith("image/"):
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_upload_bytes:
                    raise UploadTooLarge(max_upload_bytes)
                chunks.append(chunk)
            data, name = b"".join(chunks), "<upload>"
        else:
            raise ServiceError(
                415, f"unsupported Content-Type {media!r}: send multipart/form-data with field 'file', "
                     "or the image bytes as image/* or application/octet-stream"
            )
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(max_upload_bytes)
        if not data:
            raise ServiceError(400, "empty upload (zero bytes): send an image")
        return data, name

    def _infer(served: ServedModel, data: bytes, name: str, want_map: bool, want_overlay: bool, want_mask: bool) -> dict:
        queued = time.perf_counter()
        with queue_lock:
            if metrics.waiting >= max_queue:
                raise ServiceError(503, "the service is overloaded; retry shortly", {"Retry-After": "1"})
            metrics.waiting += 1
        try:
            semaphore.acquire()
        finally:
            with queue_lock:
                metrics.waiting -= 1
        try:
            with queue_lock:
                metrics.in_flight += 1
            timings = {"queue": time.perf_counter() - queued}
            t0 = time.perf_counter()
            image = read_image_bytes(data, name, max_image_pixels)
            resized, network = _network_input_pixels(served.model, image.width, image.height)
            if resized > max_image_pixels or network > max_input_pixels:
                raise ImageLoadError(
                    name, f"image of {image.width}x{image.height} pixels would become too large for the model "
                          f"after its resize (extreme aspect ratio, or a model without resize/crop)")
            timings["decode"] = time.perf_counter() - t0
            threshold = served.threshold
            pixel_threshold = served.pixel_threshold
            need_map = want_map or want_overlay or (want_mask and pixel_threshold is not None)
            prediction = inference_pool.submit(served.model.predict, [image], need_map).result()[0]
            for stage in ("backbone", "search", "map"):
                timings[stage] = prediction.timings.get(stage, 0.0)
            t0 = time.perf_counter()
            result: dict[str, Any] = {
                "model": served.name,
                "score": prediction.score,
                "is_anomalous": _decision(prediction, threshold),
                "threshold": threshold,
                "width": image.width,
                "height": image.height,
            }
            if need_map:
                pixel_map = prediction.anomaly_map
                display, scaled_image = pixel_map, image
                if max(image.width, image.height) > max_map_side:
                    factor = max_map_side / max(image.width, image.height)
                    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
                    display = np.asarray(Image.fromarray(pixel_map, mode="F").resize(size, Image.BILINEAR))
                    scaled_image = image.resize(size, Image.BILINEAR)
                if threshold is not None:  # a fixed scale: the threshold sits in the middle (green)
                    low, high = 0.5 * threshold, 1.5 * threshold
                else:  # no calibration: this image's own range
                    low, high = float(pixel_map.min()), float(pixel_map.max())
                result["map_scale"] = {"low": low, "high": high, "fixed": threshold is not None}
                result["map_width"], result["map_height"] = display.shape[1], display.shape[0]
                if want_map:
                    result["anomaly_map_png"] = _png_base64(colourise(display, low, high), "RGB")
                if want_overlay:
                    result["overlay_png"] = _image_png_base64(heat_map_overlay(scaled_image, display, low, high))
                if want_mask:
                    if pixel_threshold is None:
                        result["mask_png"] = None
                    else:
                        mask = np.where(display >= pixel_threshold, 255, 0).astype(np.uint8)
                        result["mask_png"] = _png_base64(mask, "L")
            timings["encode"] = time.perf_counter() - t0
            result["timing_ms"] = {stage: round(seconds * 1000.0, 3) for stage, seconds in timings.items()}
            metrics.count_inference(served.name, "ok")
            return result
        except ImageLoadError as exc:
            metrics.count_inference(served.name, "bad_image")
            status = 413 if isinstance(exc, _TooManyPixels) else 422
            raise ServiceError(status, f"cannot use the image: {exc.problem}") from None
        finally:
            with queue_lock:
                metrics.in_flight -= 1
            semaphore.release()

    @app.post(
        "/v1/models/{name}/predict",
        tags=["models"],
        summary="Score one image",
        openapi_extra=_PREDICT_BODY,
        responses={
            400: {"description": "empty upload or malformed form"},
            404: {"description": "unknown model"},
            413: {"description": "upload or image too large"},
            415: {"description": "unsupported Content-Type"},
            422: {"description": "not an image, corrupt or truncated image, missing field"},
            503: {"description": "overloaded; retry"},
        },
    )
    async def predict(name: str, request: Request, map: bool = False, overlay: bool = False, mask: bool = False) -> dict:
        """Score an image. `map=true` adds `anomaly_map_png` (base64 PNG heat map), `overlay=true` adds
        `overlay_png` (the heat map blended over the image), `mask=true` adds `mask_png` (binary mask
        of pixels at or above the threshold; null when the model has none)."""
        started = time.perf_counter()
        served = _served(name)
        data, filename = await _read_upload(request)
        received = time.perf_counter() - started
        result = await run_in_threadpool(_infer, served, data, filename, map, overlay, mask)
        result["timing_ms"] = {
            "total": round((time.perf_counter() - started) * 1000.0, 3),
            "receive": round(received * 1000.0, 3),
            **result["timing_ms"],
        }
        return result

    # -- the web page -------------------------------------------------------------------------

    static = resources.files("patchcore") / "static"

    def _static(filename: str) -> Response:
        try:
            content = (static / filename).read_bytes()
        except (FileNotFoundError, OSError):
            raise ServiceError(404, "page not installed (patchcore/static is missing from the package)") from None
        return Response(content, media_type=_STATIC_FILES[filename],
                        headers={"cache-control": "no-cache", "content-security-policy": _PAGE_CSP})

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def index() -> Response:
        return _static("index.html")

    @app.get("/static/{filename}", include_in_schema=False)
    def static_file(filename: str) -> Response:
        if filename not in _STATIC_FILES:
            raise ServiceError(404, "not found")
        return _static(filename)

    # Outermost: the guard sees every request, including those refused before routing.
    app.add_middleware(_Guard, max_body_bytes=max_upload_bytes + MULTIPART_OVERHEAD,
                       upload_limit=max_upload_bytes, metrics=metrics)
    return app


# -- running it ---------------------------------------------------------------------------------

_ENV_CONFIG = "PATCHCORE_SERVICE_CONFIG"


def app_from_environment():
    """App factory for uvicorn's worker processes: the configuration travels in an environment variable."""
    config = json.loads(os.environ[_ENV_CONFIG])
    return create_app(config.pop("model_dirs"), **config)


def serve(
    model_dirs: str | os.PathLike | Mapping[str, str | os.PathLike],
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Run the service with uvicorn (blocks). ``model_dirs``: a model directory, a folder of them,
    or ``{name: directory}``. Each of ``workers`` processes loads every model."""
    import uvicorn

    if isinstance(model_dirs, (str, os.PathLike)):
        model_dirs = discover_models(model_dirs)
    model_dirs = {name: str(path) for name, path in model_dirs.items()}
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    settings = dict(host=host, port=port, log_level=log_level, server_header=False,
                    timeout_keep_alive=5, limit_concurrency=max(256, 4 * options.get("max_queue", 64)))
    if workers == 1:
        app = create_app(model_dirs, max_upload_bytes, **options)
        uvicorn.run(app, **settings)
    else:
        load_models(model_dirs)  # fail here, once, with a clear message, rather than in every worker
        os.environ[_ENV_CONFIG] = json.dumps({"model_dirs": model_dirs, "max_upload_bytes": max_upload_bytes, **options})
        uvicorn.run("patchcore.service:app_from_environment", factory=True, workers=workers, **settings)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve MODEL_DIR [--host] [--port] [--workers] [--max-upload-mb]`` to the CLI's subcommands."""
    parser = subparsers.add_parser(
        "serve", help="serve models over HTTP (JSON API and web page)",
        description="Serve saved models over HTTP: a JSON API (/v1/models, /docs), a web page (/), "
                    "/healthz and Prometheus /metrics. MODEL_DIR is one model directory (named after "
                    "its folder) or a folder of model directories.")
    parser.add_argument("model", metavar="MODEL_DIR", help="a model directory, or a folder of them")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="server processes; each loads every model (default: 1)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                        help="largest accepted upload in MiB (default: 20)")
    parser.set_defaults(handler=_cmd_serve)
    return parser


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb must be positive")
    serve(args.model, host=args.host, port=args.port, workers=args.workers,
          max_upload_bytes=int(math.floor(args.max_upload_mb * 2**20)))
    return 0
