"""The HTTP inference service: a JSON API, a web page and Prometheus metrics over saved models.

Build the app with :func:`create_app` (for tests or another ASGI server); run it with
:func:`patchcore.serving.server.serve` (``patchcore serve MODEL_DIR``).

Hardening, in the order a request meets it: the body limit (:mod:`.guard`); only PNG, JPEG, BMP,
TIFF and WebP are decoded, with the image size checked from the header before any pixel is
decoded (decompression bombs: 413), and so is the size the model's resize would make of it;
decoder failures are 422 with a message, never 500; inference slots and a bounded wait
(:mod:`.inference`). Every error body is JSON: ``{"error": "..."}``.
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` class of the
# endpoints defined inside create_app (fastapi is imported there, so the CLI need not import it).
import copy
import logging
import os
import threading
import time
from importlib import resources
from typing import Mapping

from PIL import Image

from .. import __version__
from ..engine.persistence import read_manifest
from ..errors import ImageLoadError
from .guard import RequestGuard, ServiceError, UploadTooLarge
from .inference import InferenceRunner, default_slots
from .metrics import Metrics
from .models import ServedModel, load_models

logger = logging.getLogger("patchcore.service")

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest decoded image accepted (width x height): 40 megapixels, below Pillow's own bomb limit.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: Largest input the network may be fed (a model that keeps photos at their own size sees them whole).
DEFAULT_MAX_INPUT_PIXELS = 2048 * 2048
#: Heat maps, overlays and masks longer than this on a side are scaled down for the response.
DEFAULT_MAX_MAP_SIDE = 2048
#: Room for the multipart envelope around a file of ``max_upload_bytes``.
MULTIPART_OVERHEAD = 64 * 1024

_STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: For the web page only (FastAPI's /docs loads Swagger UI from a CDN with inline script).
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)

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
    model_dirs: Mapping[str, "str | os.PathLike"],
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    max_map_side: int = DEFAULT_MAX_MAP_SIDE,
    inference_slots: "int | None" = None,
    max_queue: int = 64,
    threads: "int | None" = None,
    remote_teaching: bool = False,
):
    """The FastAPI app serving ``{name: model directory}``; each model is loaded once, here.

    ``inference_slots`` (default: CPU cores / ``threads``, at least 1) bounds how many images are
    decoded and scored at once; a request that finds no free slot waits, unless ``max_queue``
    requests already wait: then it gets 503. ``threads``: CPU threads of each model's network.
    ``remote_teaching``: accept good images (``POST /v1/models/{name}/good``) from other machines
    too, not only from this one (put authentication in front of the service first).
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
    models = load_models(model_dirs, threads)
    metrics = Metrics()
    runner = InferenceRunner(metrics, inference_slots if inference_slots is not None else default_slots(threads), max_queue,
                             max_image_pixels, max_input_pixels, max_map_side)

    app = FastAPI(title="patchcore", version=__version__,
                  description="PatchCore anomaly detection: score images, get anomaly heat maps and masks.")
    app.state.models = models
    app.state.metrics = metrics
    app.state.runner = runner
    app.state.max_upload_bytes = max_upload_bytes

    def error(status: int, message: str, headers: "dict[str, str] | None" = None) -> JSONResponse:
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

    # -- service and models --------------------------------------------------------------------

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

    def served(name: str) -> ServedModel:
        if name not in models:
            raise ServiceError(404, f"unknown model {name!r}; served: {', '.join(sorted(models))}")
        return models[name]

    @app.get("/v1/models/{name}", tags=["models"], summary="One model")
    def get_model(name: str) -> dict:
        return served(name).describe()

    # -- scoring ---------------------------------------------------------------------------------

    async def read_upload(request: Request) -> "tuple[bytes, str]":
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
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
    async def predict(name: str, request: Request, map: bool = False, overlay: bool = False, mask: bool = False,
                      evidence: int = 0) -> dict:
        """Score an image. `map=true` adds `anomaly_map_png` (base64 PNG heat map), `overlay=true` adds
        `overlay_png` (the heat map blended over the image), `mask=true` adds `mask_png` (binary mask
        of pixels at or above the model's pixel threshold; null when it has none). `evidence=N` adds,
        for the N most anomalous patches, the nearest normal patch of the training images (image,
        position, distance) with `picture_png`: the patch beside that normal patch."""
        if not 0 <= evidence <= 16:
            raise ServiceError(422, f"evidence must lie between 0 and 16, got {evidence}")
        started = time.perf_counter()
        model = served(name)
        data, filename = await read_upload(request)
        received = time.perf_counter() - started
        result = await run_in_threadpool(runner.score, model, data, filename, map, overlay, mask, evidence)
        result["timing_ms"] = {
            "total": round((time.perf_counter() - started) * 1000.0, 3),
            "receive": round(received * 1000.0, 3),
            **result["timing_ms"],
        }
        return result

    # -- teach-in --------------------------------------------------------------------------------

    teach_locks = {name: threading.Lock() for name in models}

    async def read_images(request: Request) -> "list[tuple[bytes, str]]":
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "multipart/form-data":
            return [await read_upload(request)]
        form = await request.form(max_files=64, max_fields=64)
        try:
            uploads = [item for item in form.getlist("file") if not isinstance(item, str)]
            if not uploads:
                raise ServiceError(422, "the multipart form needs one or more fields 'file' holding good images")
            files = []
            for upload in uploads:
                data = await upload.read(max_upload_bytes + 1)
                if len(data) > max_upload_bytes:
                    raise UploadTooLarge(max_upload_bytes)
                files.append((data, upload.filename or "<upload>"))
            return files
        finally:
            await form.close()

    def teach(served_model: ServedModel, files: "list[tuple[bytes, str]]") -> dict:
        with teach_locks[served_model.name]:  # one teach-in per model at a time; scoring goes on
            current = models[served_model.name]
            try:
                photos = [runner.decode(current, data, name) for data, name in files]
            except ImageLoadError as error:
                raise runner.refusal(error) from None
            model = copy.copy(current.model)  # requests in flight keep scoring with the old bank
            model.partial_fit(photos)
            model.save(current.directory)
            models[current.name] = ServedModel(current.name, current.directory, model, read_manifest(current.directory))
            return {"model": current.name, **model.teach_in_[-1], "threshold": models[current.name].threshold}

    @app.post("/v1/models/{name}/good", tags=["models"], summary="Teach the model good images",
              openapi_extra=_PREDICT_BODY,
              responses={403: {"description": "not from this machine (see --allow-remote-teach-in)"}})
    async def add_good(name: str, request: Request) -> dict:
        """Add good images (one raw image, or a multipart form with fields `file`) to the model's
        memory bank without refitting: the model directory is replaced atomically and the service
        swaps to the new model; requests in flight finish on the old one. Thresholds are kept.
        Accepted from this machine only, unless the service was started with remote teaching."""
        host = request.client.host if request.client else ""
        if not remote_teaching and host not in ("127.0.0.1", "::1", "localhost"):
            raise ServiceError(403, "teaching a model is accepted from this machine only (start the service with "
                                    "--allow-remote-teach-in to allow it from others)")
        model = served(name)
        files = await read_images(request)
        return await run_in_threadpool(teach, model, files)

    # -- the web page ----------------------------------------------------------------------------

    static = resources.files("patchcore.serving") / "static"

    def static_response(filename: str) -> Response:
        try:
            content = (static / filename).read_bytes()
        except (FileNotFoundError, OSError):
            raise ServiceError(404, "page not installed (patchcore/serving/static is missing from the package)") from None
        return Response(content, media_type=_STATIC_FILES[filename],
                        headers={"cache-control": "no-cache", "content-security-policy": _PAGE_CSP})

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def index() -> Response:
        return static_response("index.html")

    @app.get("/static/{filename}", include_in_schema=False)
    def static_file(filename: str) -> Response:
        if filename not in _STATIC_FILES:
            raise ServiceError(404, "not found")
        return static_response(filename)

    # Outermost: the guard sees every request, including those refused before routing.
    app.add_middleware(RequestGuard, max_body_bytes=max_upload_bytes + MULTIPART_OVERHEAD,
                       upload_limit=max_upload_bytes, metrics=metrics)
    return app
