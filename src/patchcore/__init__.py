"""patchcore: industrial visual anomaly detection with PatchCore (Roth et al., CVPR 2022)."""

__version__ = "0.1.0"

from .errors import ImageLoadError, ModelFormatError, NotFittedError, PatchCoreError, WeightsUnavailableError  # noqa: E402
from .model import PatchCore, Prediction  # noqa: E402

__all__ = [
    "PatchCore",
    "Prediction",
    "PatchCoreError",
    "NotFittedError",
    "ImageLoadError",
    "ModelFormatError",
    "WeightsUnavailableError",
    "__version__",
]
