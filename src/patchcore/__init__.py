"""patchcore: industrial visual anomaly detection with PatchCore (Roth et al., CVPR 2022).

The package is layered; imports flow one way, from the top of this list to the bottom:

- ``patchcore.cli``: the ``patchcore`` command (argument parsing lives here alone);
- ``patchcore.serving``: the HTTP inference service;
- ``patchcore.evaluation``: data sets, metrics, ``evaluate``, the paper's experiments, reports;
- ``patchcore.engine``: the method itself (images, backbones, features, coreset, search,
  scoring, the model, persistence).
"""

import os as _os

# OpenMP's default spin-waiting made a 2-thread forward pass 10x slower beside another busy
# process; passive waiting costs nothing measurable on a quiet machine. Set before torch (or
# onnxruntime) starts its thread pool, keeping any value the user chose.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

from .errors import ImageLoadError, ModelFormatError, NotFittedError, PatchCoreError, WeightsUnavailableError  # noqa: E402
from .engine.settings import DEFAULTS, PRESETS  # noqa: E402

#: Imported on first use (PEP 562): ``import patchcore`` alone pulls in neither torch nor timm, so
#: the torch-free runtime and the ``patchcore`` command on an exported model work without them.
_LAZY = {
    "PatchCore": "patchcore.engine.model",
    "PatchCoreEnsemble": "patchcore.engine.ensemble",
    "Prediction": "patchcore.engine.prediction",
    "ExportedModel": "patchcore.engine.runtime",
    "load_model": "patchcore.engine.loading",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'patchcore' has no attribute {name!r}")


__all__ = [
    "PatchCore",
    "PatchCoreEnsemble",
    "ExportedModel",
    "load_model",
    "DEFAULTS",
    "PRESETS",
    "Prediction",
    "PatchCoreError",
    "NotFittedError",
    "ImageLoadError",
    "ModelFormatError",
    "WeightsUnavailableError",
    "__version__",
]
