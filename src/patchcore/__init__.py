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
# process; passive waiting costs nothing measurable on a quiet machine. Set before torch starts
# its thread pool (torch is imported below), keeping any value the user chose.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

from .errors import ImageLoadError, ModelFormatError, NotFittedError, PatchCoreError, WeightsUnavailableError  # noqa: E402
from .engine.ensemble import PatchCoreEnsemble  # noqa: E402
from .engine.model import PRESETS, PatchCore  # noqa: E402
from .engine.prediction import Prediction  # noqa: E402

__all__ = [
    "PatchCore",
    "PatchCoreEnsemble",
    "PRESETS",
    "Prediction",
    "PatchCoreError",
    "NotFittedError",
    "ImageLoadError",
    "ModelFormatError",
    "WeightsUnavailableError",
    "__version__",
]
