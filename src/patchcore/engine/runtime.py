"""Scoring with an exported model: onnxruntime (or openvino), numpy, scipy, Pillow, faiss; no torch.

:class:`ExportedModel` has the scoring API of a fitted :class:`~patchcore.engine.model.PatchCore`
(``predict``, ``iter_predict``, thresholds, maps), from the same code: only the network differs,
an ONNX graph instead of torch modules, which gives the same patch features to about 1e-6.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from . import persistence
from .detector import Detector
from .geometry import InputTransform
from .onnx_network import OnnxNetwork
from .settings import ModelSettings, read_settings
from .tiling import TiledEmbedding


class _OpenVinoNetwork:
    """Runs OpenVINO IR on the CPU: numpy pixels in, numpy patch features out."""

    def __init__(self, xml: Path, weights: Path, threads: int | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        # f32: on CPUs with bf16 units OpenVINO would otherwise compute in bf16, moving scores by ~0.5%.
        config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.compiled = core.compile_model(core.read_model(model=str(xml), weights=str(weights)), "CPU", config)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.compiled(np.ascontiguousarray(pixels, dtype=np.float32))[0])


class ExportedModel(Detector):
    """A model written by ``patchcore export``, loaded with :meth:`load`."""

    def __init__(self, directory: str | os.PathLike, settings: ModelSettings) -> None:
        self.directory = Path(directory)
        self.settings_ = settings

    def settings(self) -> ModelSettings:
        """The settings recorded in the export (every setting of the model it was made from)."""
        return self.settings_

    def feature_layers(self) -> list[str]:
        """The backbone stages the patch features come from (exports before 0.3 kept them in the settings)."""
        return list(self.export_state_.get("layers") or self.settings_.layers or [])

    def set_params(self, **changes) -> "ExportedModel":
        """Change settings that say how the export runs (``batch_size``, ``progress``, ``threads``
        before loading); as :meth:`PatchCore.set_params`."""
        self.settings_ = self.settings_.replace(**changes)
        return self

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int | None = None) -> "ExportedModel":
        """Read and check an export directory; ``threads`` overrides the CPU threads of the network."""
        manifest, tensors, paths = persistence.read_model(directory)
        if manifest["format"] != persistence.EXPORT_FORMAT_NAME:
            raise ModelFormatError(f"{directory}: a saved PatchCore model, not an export: load it with "
                                   "patchcore.load_model or PatchCore.load, or run 'patchcore export' on it")
        try:
            settings, unrecorded = read_settings(manifest["settings"], f"{directory}", manifest["format_version"])
            settings = settings.replace(progress=False, **({"threads": threads} if threads is not None else {}))
            model = cls(directory, settings)
            model.unrecorded_settings_ = unrecorded
            state = manifest["state"]
            model.runtime_ = state["runtime"]
            network = (OnnxNetwork(paths["network"], settings.threads) if model.runtime_ == "onnx"
                       else _OpenVinoNetwork(paths["network"], paths["network_weights"], settings.threads))
            model.transform_ = InputTransform(settings.resize, settings.crop, tuple(state["mean"]), tuple(state["std"]),
                                              stride=int(state["stride"]), cell=int(state["cell"]))
            model.embedding_ = TiledEmbedding(network, int(state["stride"]), int(state["cell"]), settings.tile_size,
                                              settings.tile_overlap, settings.batch_size)
            model.restore_bank(tensors["memory_bank"], state)
            model.restore_decision_state(state)
            model.export_state_ = {key: state[key] for key in ("runtime", "onnx_opset", "mean", "std", "stride", "cell",
                                                               "feature_width", "layers") if key in state}
            model.network_files_ = {role: (path.suffix, path) for role, path in paths.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{directory}: export is inconsistent ({type(exc).__name__}: {exc})") from exc
        return model

    def save(self, directory: str | os.PathLike | None = None, event: dict | None = None,
             keep_versions: int = persistence.KEEP_VERSIONS) -> None:
        """Write the export again as its new version (after :meth:`partial_fit` or new thresholds),
        atomically, to ``directory`` (default: where it was loaded from); the network files are
        carried over. ``event`` (``action``, ``who``) is what the directory's history records."""
        directory = Path(directory) if directory is not None else self.directory
        blobs = {role: (suffix, path.read_bytes()) for role, (suffix, path) in self.network_files_.items()}
        state = {**self.export_state_, **self.decision_state(), **self.bank_state()}
        persistence.write_model(directory, self.settings_.to_json(), state, {"memory_bank": self.bank_tensors()},
                                blobs=blobs, format_name=persistence.EXPORT_FORMAT_NAME,
                                event=self.version_event(event), keep_versions=keep_versions)
        self.network_files_ = {role: (suffix, directory / path.name) for role, (suffix, path) in self.network_files_.items()}

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.directory)!r}, backbone={self.settings_.backbone!r})"
