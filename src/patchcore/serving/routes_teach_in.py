"""Teach-in and rollback routes: ``POST /v1/models/{name}/good``, ``POST .../rollback`` and
``GET .../history``. What they enforce (credentials, bounds, locks) is in :mod:`.teach_in`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.persistence import history
from .guard import ServiceError, UploadTooLarge
from .routes_dependencies import UNKNOWN_MODEL, ModelName, Models, Runner, ServiceLimits, error_responses, find_model
from .routes_scoring import UPLOAD_ERRORS, read_upload
from .teach_in import TeachInPolicy, authorise, check_megapixels, roll_back, teach


async def get_policy(request: Request) -> TeachInPolicy:
    return request.app.state.teach_in


Policy = Annotated[TeachInPolicy, Depends(get_policy)]

router = APIRouter(tags=["teach-in"])

_AUTH_ERRORS = error_responses({
    401: "no teach-in token, or not one of the service's (send Authorization: Bearer TOKEN)",
    403: "teach-in is off (no token file), or the request comes from a web page of another site",
})


async def read_images(request: Request, max_upload_bytes: int, max_images: int) -> list[tuple[bytes, str]]:
    """The uploaded images: fields ``file`` of a multipart form, or one raw image body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "multipart/form-data":
        return [await read_upload(request, max_upload_bytes)]
    try:
        form = await request.form(max_files=max_images, max_fields=max_images + 16)
    except StarletteHTTPException as error:
        if "files" in str(error.detail).lower():
            raise ServiceError(413, f"at most {max_images} images per teach-in request") from None
        raise
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


@router.post("/v1/models/{name}/good", summary="Teach the model good images",
             openapi_extra={"requestBody": {
                 "required": True,
                 "description": "Good images: a multipart form with one or more fields `file`, or one image's raw "
                                "bytes with an image/* or application/octet-stream Content-Type.",
                 "content": {
                     "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                         "file": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}}}},
                     "application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1}},
                 }}},
             responses={**_AUTH_ERRORS, **UNKNOWN_MODEL, **UPLOAD_ERRORS,
                        **error_responses({409: "the memory bank is full (max_bank_size)",
                                           503: "overloaded; retry"})})
async def add_good(name: ModelName, request: Request, models: Models, runner: Runner, limits: ServiceLimits,
                   policy: Policy) -> dict:
    """Add good images to the model's memory bank without refitting (teach-in). Needs
    `Authorization: Bearer TOKEN` (a token of the service's token file) and is refused from web
    pages of other sites. The result is a new model version, saved atomically and recorded with
    the token's name; `POST .../rollback` undoes it. Requests in flight finish on the old version.
    Thresholds are kept."""
    who = authorise(request.headers, policy)
    find_model(models, name)
    files = await read_images(request, limits.max_upload_bytes, policy.max_images)
    if len(files) > policy.max_images:
        raise ServiceError(413, f"at most {policy.max_images} images per teach-in request")
    check_megapixels(files, policy.max_megapixels)
    return await runner.run(teach, models, name, files, who, runner)


@router.post("/v1/models/{name}/rollback", summary="Restore an earlier version of the model",
             responses={**_AUTH_ERRORS, **UNKNOWN_MODEL,
                        **error_responses({409: "that version cannot be restored (or is the current one)",
                                           422: "invalid parameter", 503: "overloaded; retry"})})
async def restore_version(name: ModelName, request: Request, models: Models, runner: Runner, policy: Policy,
                    to: Annotated[int | None, Query(ge=1, description="the version to restore (default: the one "
                                                                      "before the current version)")] = None) -> dict:
    """Make an earlier version of the model current again (default: the version before the
    current one), atomically and as a new version, so the history keeps both. Scores afterwards
    equal those of the restored version bit for bit. Needs a teach-in token, as teach-in does."""
    who = authorise(request.headers, policy)
    find_model(models, name)
    return await runner.run(roll_back, models, name, to, who)


@router.get("/v1/models/{name}/history", summary="The model's versions", responses={**UNKNOWN_MODEL})
async def model_history(name: ModelName, models: Models) -> dict:
    """Every version written to the model's directory, oldest first: when, what made it (fit,
    teach-in, rollback, export), who (a teach-in token's name, or cli), the images taught (their
    SHA-256), the memory bank's size, and whether it can still be restored."""
    served = find_model(models, name)
    return {"model": name, "current_version": served.version, "versions": history(served.directory)}
