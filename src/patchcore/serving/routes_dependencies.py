"""What every router shares: the service's state, read from ``app.state`` by FastAPI dependencies,
the served model of a ``{name}`` path (404 when unknown), and the documented error answers.

The state getters are ``async`` on purpose: FastAPI runs a plain ``def`` dependency in the thread
pool, and ``/healthz`` must not wait for a thread (see :mod:`.inference`). Looking a model up is
a plain ``def``: the registry may load a new version from disk then, which must not stall the
event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Mapping

from fastapi import Depends, Path, Request
from pydantic import BaseModel

from .guard import ServiceError
from .inference import InferenceRunner
from .metrics import Metrics
from .models import ServedModel


@dataclass(frozen=True)
class Limits:
    """Request limits the routes enforce themselves (the body limit is the guard's)."""

    max_upload_bytes: int


class ErrorBody(BaseModel):
    """Every error answer of the service."""

    error: str


def error_responses(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for ``{status: description}``, each with the JSON error body."""
    return {status: {"model": ErrorBody, "description": text} for status, text in described.items()}


#: What a ``{name}`` route answers for a model it does not serve.
UNKNOWN_MODEL = error_responses({404: "unknown model"})


async def get_models(request: Request) -> Mapping[str, ServedModel]:
    return request.app.state.models


async def get_runner(request: Request) -> InferenceRunner:
    return request.app.state.runner


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_limits(request: Request) -> Limits:
    return request.app.state.limits


Models = Annotated[Mapping[str, ServedModel], Depends(get_models)]
Runner = Annotated[InferenceRunner, Depends(get_runner)]
ServiceMetrics = Annotated[Metrics, Depends(get_metrics)]
ServiceLimits = Annotated[Limits, Depends(get_limits)]


#: The ``{name}`` path parameter.
ModelName = Annotated[str, Path(description="The model's name (see GET /v1/models)")]


def find_model(models: Mapping[str, ServedModel], name: str) -> ServedModel:
    """The model served as ``name``; 404 when there is none."""
    if name not in models:
        raise ServiceError(404, f"unknown model {name!r}; served: {', '.join(sorted(models))}")
    return models[name]


def served_model(models: Models, name: ModelName) -> ServedModel:
    """The model of the ``{name}`` path; 404 when it is not served."""
    return find_model(models, name)


Served = Annotated[ServedModel, Depends(served_model)]
