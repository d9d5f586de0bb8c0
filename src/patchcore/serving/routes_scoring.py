"""Scoring: ``POST /v1/models/{name}/predict``, and reading an upload (also used by teach-in).

Every bound the service enforces on a request is declared in the OpenAPI description too (query
ranges, body media types, error statuses), so that generated clients and schema-based fuzzers
agree with the service.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import socket
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from ..engine.persistence import model_sha256
from ..errors import PatchCoreError
from .guard import ServiceError, UploadTooLarge
from .inference import UPLOAD_FORMATS
from .routes_dependencies import Runner, Served, ServiceLimits, error_responses

#: The most anomalous patches ``evidence`` may ask for.
MAX_EVIDENCE = 16

_IMAGE_MEDIA_TYPES = [f"image/{name.lower()}" for name in UPLOAD_FORMATS]
#: A file's bytes; an empty upload is refused (400).
_FILE = {"type": "string", "format": "binary", "minLength": 1}
_BINARY = {"schema": _FILE}

#: The request body of a route taking one image (``openapi_extra``: the routes read the raw request).
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: a multipart form with field `file`, or the raw bytes with an image/* "
                       "or application/octet-stream Content-Type. PNG, JPEG, BMP, TIFF or WebP; 8- or 16-bit, "
                       "grayscale, RGB or RGBA.",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": _FILE}},
                "encoding": {"file": {"contentType": ", ".join(_IMAGE_MEDIA_TYPES)}},
            },
            "application/octet-stream": _BINARY,
            **{media_type: _BINARY for media_type in _IMAGE_MEDIA_TYPES},
        },
    }
}

#: The errors of a route reading an upload.
UPLOAD_ERRORS = error_responses({
    400: "empty upload, malformed form or invalid Content-Length",
    413: "upload or image too large",
    415: "unsupported Content-Type",
    422: "not an image, corrupt or truncated image, missing field, invalid parameter",
})

router = APIRouter(tags=["models"])
logger = logging.getLogger("patchcore.service")


async def read_upload(request: Request, max_upload_bytes: int) -> tuple[bytes, str]:
    """The uploaded image's bytes and file name: the multipart field ``file``, or the raw body."""
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


@router.post(
    "/v1/models/{name}/predict",
    summary="Score one image",
    openapi_extra=IMAGE_BODY,
    responses={
        **UPLOAD_ERRORS,
        **error_responses({404: "unknown model", 503: "overloaded; retry (see Retry-After)"}),
    },
)
async def predict(
    request: Request,
    model: Served,
    runner: Runner,
    limits: ServiceLimits,
    map: Annotated[bool, Query(description="add `anomaly_map_png`")] = False,
    overlay: Annotated[bool, Query(description="add `overlay_png`")] = False,
    mask: Annotated[bool, Query(description="add `mask_png`")] = False,
    evidence: Annotated[int, Query(ge=0, le=MAX_EVIDENCE, description="add `evidence` for this many patches")] = 0,
) -> dict:
    """Score an image. `map=true` adds `anomaly_map_png` (base64 PNG heat map), `overlay=true` adds
    `overlay_png` (the heat map blended over the image), `mask=true` adds `mask_png` (binary mask
    of pixels at or above the model's pixel threshold; null when it has none). `evidence=N` adds,
    for the N most anomalous patches, the nearest normal patch of the training images (image,
    position, distance) with `picture_png`: the patch beside that normal patch. `is_anomalous`
    is the verdict (`score >= threshold`; null without a threshold) and `threshold_kind` says
    which threshold gave it: `self-calibrated from N training photos` (the default fit's),
    `calibrated on N held-out good photos`, `set by hand` or `none`."""
    started = time.perf_counter()
    data, filename = await read_upload(request, limits.max_upload_bytes)
    received = time.perf_counter() - started
    result = await runner.score(model, data, filename, map, overlay, mask, evidence)
    result["timing_ms"] = {
        "total": round((time.perf_counter() - started) * 1000.0, 3),
        "receive": round(received * 1000.0, 3),
        **result["timing_ms"],
    }
    history = getattr(request.app.state, "history", None)
    if history is not None:
        _record(history, model, data, filename, result)
    return result


@functools.lru_cache(maxsize=64)
def _model_sha256(directory: str, stamp: tuple[int, int, int]) -> str:
    """The SHA-256 of a served version's manifest, once per version (``stamp`` names the version)."""
    return model_sha256(directory)


def _record(writer, served, data: bytes, filename: str, result: dict) -> None:
    """Queue the verdict for the history database (``patchcore serve --history``). A database
    that stopped taking verdicts is logged, and the answer still goes out: the line needs it."""
    from ..station.schema import Inspection

    verdict = "unrated" if result["is_anomalous"] is None else ("ng" if result["is_anomalous"] else "ok")
    try:
        writer.put(Inspection(
            source="service", station=socket.gethostname(), photo_path=filename,
            photo_sha256=hashlib.sha256(data).hexdigest(), model_name=served.name, model_version=served.version,
            model_sha256=_model_sha256(str(served.directory), served.stamp), score=float(result["score"]),
            verdict=verdict, threshold=served.threshold, pixel_threshold=served.pixel_threshold,
            timings=dict(result["timing_ms"])))
    except (PatchCoreError, OSError) as error:
        logger.error("not recorded in the history database: %s", error)
