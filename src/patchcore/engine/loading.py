"""One way to load any model directory: a saved PatchCore or an export; neither imports torch
(a saved model runs its own network graph; see :mod:`.network_cache`)."""

from __future__ import annotations

import os

from ..errors import ModelFormatError
from . import persistence


def load_model(directory: str | os.PathLike, threads: int | None = None):
    """The model in ``directory``: an :class:`~patchcore.engine.runtime.ExportedModel` for an export,
    else a :class:`~patchcore.engine.model.PatchCore` (which needs scikit-learn, and torch only for
    a model saved before models kept their graph, once per backbone)."""
    manifest = persistence.read_manifest(directory)
    if manifest["format"] == persistence.EXPORT_FORMAT_NAME:
        from .runtime import ExportedModel

        return ExportedModel.load(directory, threads=threads)
    try:
        from .model import PatchCore
    except ImportError as error:
        raise ModelFormatError(
            f"{directory}: a saved PatchCore model needs {error.name or error} ({error}); install 'patchcore[train]', "
            "or run 'patchcore export' on it and use the export here"
        ) from None
    return PatchCore.load(directory, threads=threads)
