"""Exceptions raised by patchcore; each names the file or setting at fault."""

from __future__ import annotations


class PatchCoreError(Exception):
    """Base class of every error patchcore raises on purpose."""


class NotFittedError(PatchCoreError, ValueError):
    """A model was used before ``fit`` (or ``load``) gave it a memory bank."""


class ImageLoadError(PatchCoreError, ValueError):
    """An input image could not be read or decoded."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class WeightsUnavailableError(PatchCoreError, RuntimeError):
    """Pretrained backbone weights could not be found, downloaded or loaded."""


class ModelFormatError(PatchCoreError, ValueError):
    """A saved model directory is missing, altered, or of an unknown format."""
