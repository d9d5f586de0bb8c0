"""Teach-in: ``POST /v1/models/{name}/good`` adds good images to a served model's memory bank.

Moved here from ``create_app`` as it was (its state now comes from dependencies, and the new
version is swapped in through the model registry's ``reload``); its behaviour is about to be
redesigned.
"""

from __future__ import annotations

import copy
import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ..errors import ImageLoadError
from .guard import ServiceError, UploadTooLarge
from .inference import InferenceRunner
from .models import ModelRegistry, ServedModel
from .routes_dependencies import UNKNOWN_MODEL, ModelName, Models, Runner, ServiceLimits, find_model
from .routes_scoring import IMAGE_BODY, UPLOAD_ERRORS, read_upload

router = APIRouter(tags=["models"])


async def get_teach_locks(request: Request) -> dict[str, threading.Lock]:
    """One lock per model: one teach-in per model at a time."""
    return request.app.state.teach_locks


async def get_remote_teaching(request: Request) -> bool:
    return request.app.state.remote_teaching


async def read_images(request: Request, max_upload_bytes: int) -> list[tuple[bytes, str]]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "multipart/form-data":
        return [await read_upload(request, max_upload_bytes)]
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


def teach(served_model: ServedModel, files: list[tuple[bytes, str]], models: ModelRegistry,
          runner: InferenceRunner, teach_locks: dict[str, threading.Lock]) -> dict:
    with teach_locks[served_model.name]:  # one teach-in per model at a time; scoring goes on
        current = models[served_model.name]
        try:
            photos = [runner.decode(current, data, name) for data, name in files]
        except ImageLoadError as error:
            raise runner.refusal(error) from None
        model = copy.copy(current.model)  # requests in flight keep scoring with the old bank
        model.partial_fit(photos)
        model.save(current.directory)
        swapped = models.reload(current.name)  # the registry loads the version just saved
        return {"model": current.name, **model.teach_in_[-1], "threshold": swapped.threshold}


@router.post("/v1/models/{name}/good", summary="Teach the model good images",
             openapi_extra=IMAGE_BODY,
             responses={403: {"description": "not from this machine (see --allow-remote-teach-in)"},
                        **UNKNOWN_MODEL, **UPLOAD_ERRORS})
async def add_good(
    name: ModelName,
    request: Request,
    models: Models,
    runner: Runner,
    limits: ServiceLimits,
    teach_locks: Annotated[dict[str, threading.Lock], Depends(get_teach_locks)],
    remote_teaching: Annotated[bool, Depends(get_remote_teaching)],
) -> dict:
    """Add good images (one raw image, or a multipart form with fields `file`) to the model's
    memory bank without refitting: the model directory is replaced atomically and the service
    swaps to the new model; requests in flight finish on the old one. Thresholds are kept.
    Accepted from this machine only, unless the service was started with remote teaching."""
    host = request.client.host if request.client else ""
    if not remote_teaching and host not in ("127.0.0.1", "::1", "localhost"):
        raise ServiceError(403, "teaching a model is accepted from this machine only (start the service with "
                                "--allow-remote-teach-in to allow it from others)")
    model = find_model(models, name)
    files = await read_images(request, limits.max_upload_bytes)
    return await run_in_threadpool(teach, model, files, models, runner, teach_locks)
