"""The models served: ``GET /v1/models`` and ``GET /v1/models/{name}``.

Plain ``def`` handlers: they run in the thread pool (which scoring does not use), so a model
description that reads files never stalls the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter

from .routes_dependencies import UNKNOWN_MODEL, Models, Served

router = APIRouter(tags=["models"])


@router.get("/v1/models", summary="The models served")
def list_models(models: Models) -> dict:
    return {"models": [models[name].describe() for name in sorted(models)]}


@router.get("/v1/models/{name}", summary="One model", responses=UNKNOWN_MODEL)
def get_model(model: Served) -> dict:
    return model.describe()
