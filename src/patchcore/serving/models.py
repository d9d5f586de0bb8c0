"""The models a service serves: found in a folder, loaded at start-up and again whenever a new
version is committed to their directory, described for clients."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..engine.loading import load_model
from ..engine.persistence import EXPORT_FORMAT_NAME, MANIFEST, manifest_version, read_manifest
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


def _stamp(directory: Path) -> tuple[int, int, int]:
    """What changes whenever a writer commits a new version (the manifest is replaced by a rename)."""
    status = os.stat(directory / MANIFEST)
    return status.st_ino, status.st_mtime_ns, status.st_size


@dataclass(frozen=True)
class ServedModel:
    """One version of a served model, as loaded from its directory."""

    name: str
    directory: Path
    model: Any  # a PatchCore, or an ExportedModel (which needs no torch)
    manifest: dict[str, Any]
    #: The manifest's identity when this version was loaded (see :class:`ModelRegistry`).
    stamp: tuple[int, int, int]

    @classmethod
    def load(cls, name: str, directory: Path, threads: int | None) -> "ServedModel":
        """The current version in ``directory``; the manifest and the model are read from the same
        version even while another process writes a new one."""
        for _ in range(5):
            before = _stamp(directory)
            manifest = read_manifest(directory)
            model = load_model(directory, threads=threads)
            if _stamp(directory) == before:
                return cls(name, directory, model, manifest, before)
        raise ModelFormatError(f"{directory}: the model changed five times while it was being loaded; try again")

    @property
    def version(self) -> int:
        return manifest_version(self.manifest)

    @property
    def threshold(self) -> float | None:
        return self.model.threshold_

    @property
    def pixel_threshold(self) -> float | None:
        return self.model.pixel_threshold_

    def describe(self) -> dict[str, Any]:
        settings = self.model.settings()
        return {
            "name": self.name,
            "version": self.version,
            "kind": "export" if self.manifest.get("format") == EXPORT_FORMAT_NAME else "saved model",
            "backbone": settings.backbone,
            "layers": self.model.feature_layers(),
            "memory_bank_size": int(self.model.memory_bank_.shape[0]),
            "max_bank_size": settings.max_bank_size,
            "feature_dim": int(self.model.memory_bank_.shape[1]),
            "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold,
            "threshold_source": self.model.threshold_source_,
            "threshold_kind": self.model.threshold_kind(),
            "calibration": self.model.threshold_estimate(),
            "evidence": self.model.memory_bank_origin_ is not None,
            "format_version": self.manifest.get("format_version"),
            "patchcore_version": self.manifest.get("patchcore_version"),
            "saved_at": self.manifest.get("saved_at"),
            "resize": list(settings.resize) if isinstance(settings.resize, tuple) else settings.resize,
            "crop": settings.crop,
            "tile_size": settings.tile_size,
        }


class ModelRegistry(Mapping[str, ServedModel]):
    """The served models by name, always the newest version on disk.

    Several processes (``serve --workers N``) may serve one model directory, and a teach-in or
    rollback in any of them writes a new version. Each look-up compares the manifest's identity
    (one ``stat``) with the loaded version's and, when another process committed a new version,
    loads it before answering, so every request is scored with the current version. A version that
    cannot be loaded (damaged, altered) is logged and the loaded one kept.
    """

    def __init__(self, served: dict[str, ServedModel], threads: int | None) -> None:
        self._served = dict(served)
        self._threads = threads
        self._locks = {name: threading.RLock() for name in served}

    def __getitem__(self, name: str) -> ServedModel:
        current = self._served[name]
        try:
            fresh = _stamp(current.directory) == current.stamp
        except OSError:
            return current
        return current if fresh else self.reload(name)

    def __iter__(self):
        return iter(self._served)

    def __len__(self) -> int:
        return len(self._served)

    def install(self, name: str, model: Any) -> ServedModel:
        """Serve ``model`` as the version just committed to its directory by this process (the
        caller holds the directory's lock, so the manifest on disk is the one it wrote)."""
        with self._locks[name]:
            directory = self._served[name].directory
            self._served[name] = ServedModel(name, directory, model, read_manifest(directory), _stamp(directory))
            return self._served[name]

    def lock(self, name: str) -> threading.RLock:
        """This process's lock for changing model ``name`` (the model directory's file lock
        serialises writers across processes)."""
        return self._locks[name]

    def reload(self, name: str) -> ServedModel:
        """Load the version now on disk if it is not the one served (one loader at a time)."""
        with self._locks[name]:
            current = self._served[name]
            if _stamp(current.directory) == current.stamp:
                return current
            try:
                fresh = ServedModel.load(name, current.directory, self._threads)
            except (ModelFormatError, OSError) as error:
                logger.error("model %r changed on disk but cannot be loaded; still serving version %d: %s",
                             name, current.version, error)
                return current
            self._served[name] = fresh
            logger.info("model %r: now serving version %d (was %d)", name, fresh.version, current.version)
            return fresh


def load_models(model_dirs: Mapping[str, str | os.PathLike], threads: int | None = None) -> ModelRegistry:
    """Load each model once (saved or exported); a damaged or altered model stops start-up with a
    :class:`ModelFormatError`."""
    if not model_dirs:
        raise ValueError("no models to serve")
    served = {}
    for name, directory in model_dirs.items():
        if not name or "/" in name:
            raise ValueError(f"invalid model name {name!r}")
        served[name] = ServedModel.load(name, Path(directory), threads)
        logger.info("loaded model %r version %d from %s (memory bank %s)", name, served[name].version, directory,
                    served[name].model.memory_bank_.shape)
    return ModelRegistry(served, threads)
