"""The models a service serves: found in a folder, loaded once at start-up, described for clients."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..engine.loading import load_model
from ..engine.persistence import EXPORT_FORMAT_NAME, MANIFEST, read_manifest
from ..errors import ModelFormatError

logger = logging.getLogger("patchcore.service")


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
    model: Any  # a PatchCore, or an ExportedModel (which needs no torch)
    manifest: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        value = getattr(self.model, "threshold_", None)
        return None if value is None else float(value)

    @property
    def pixel_threshold(self) -> float | None:
        value = getattr(self.model, "pixel_threshold_", None)
        return None if value is None else float(value)

    def describe(self) -> dict[str, Any]:
        settings = self.model.settings()
        return {
            "name": self.name,
            "kind": "export" if self.manifest.get("format") == EXPORT_FORMAT_NAME else "saved model",
            "backbone": settings.get("backbone"),
            "layers": list(self.model.backbone_spec_.layers) if hasattr(self.model, "backbone_spec_") else settings.get("layers"),
            "memory_bank_size": int(self.model.memory_bank_.shape[0]),
            "feature_dim": int(self.model.memory_bank_.shape[1]),
            "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold,
            "threshold_source": getattr(self.model, "threshold_source_", None),
            "evidence": getattr(self.model, "memory_bank_origin_", None) is not None,
            "format_version": self.manifest.get("format_version"),
            "patchcore_version": self.manifest.get("patchcore_version"),
            "saved_at": self.manifest.get("saved_at"),
            "resize": settings.get("resize"),
            "crop": settings.get("crop"),
            "tile_size": settings.get("tile_size"),
        }


def load_models(model_dirs: Mapping[str, str | os.PathLike], threads: int | None = None) -> dict[str, ServedModel]:
    """Load each model once (saved or exported); a damaged or altered model stops start-up with a
    :class:`ModelFormatError`."""
    if not model_dirs:
        raise ValueError("no models to serve")
    served = {}
    for name, directory in model_dirs.items():
        if not name or "/" in name:
            raise ValueError(f"invalid model name {name!r}")
        directory = Path(directory)
        manifest = read_manifest(directory)
        model = load_model(directory, threads=threads)
        model.progress = False
        served[name] = ServedModel(name, directory, model, manifest)
        logger.info("loaded model %r from %s (memory bank %s)", name, directory, model.memory_bank_.shape)
    return served
