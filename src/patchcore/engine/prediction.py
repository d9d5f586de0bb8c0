"""What a detector returns for one image."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import ImageLoadError
from .geometry import Placement
from .thresholds import defect_mask, is_anomalous

#: Receives each image that could not be read, instead of the error being raised.
ErrorHandler = Callable[[ImageLoadError], None]


@dataclass
class Evidence:
    """Why a patch is anomalous: the nearest normal patch among the training images, and how far.

    Boxes are (left, top, right, bottom) in each photo's own pixels, around the patch and its
    neighbourhood.
    """

    #: The anomalous patch on the test image's grid, its box in the test photo, and its score
    #: (the distance to the nearest normal patch).
    row: int
    column: int
    box: tuple[int, int, int, int]
    distance: float
    #: The nearest normal patch: its training image (as it was given to fit), grid position and box.
    training_image: str
    training_row: int
    training_column: int
    training_box: tuple[int, int, int, int] | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prediction:
    """The result for one image."""

    name: str
    #: Image anomaly score (eq. 7 re-weighted maximum patch distance, or the plain maximum).
    score: float
    #: Per-pixel anomaly scores at the image's original size (height, width), float32.
    anomaly_map: np.ndarray | None
    #: Distances of each patch to the memory bank on the feature grid (grid height, grid width).
    patch_scores: np.ndarray
    #: Seconds spent per stage for this image (its share of the batch).
    timings: dict[str, float] = field(default_factory=dict)
    #: ``score >= threshold`` when the model has a threshold, else ``None``.
    is_anomalous: bool | None = None
    #: Pixels whose anomaly score reaches the pixel threshold (with a threshold and a map), else ``None``.
    mask: np.ndarray | None = None
    #: Where the network input came from in the photo (to make the map later without the photo).
    placement: Placement | None = None
    #: The decoded photo, when asked for (``keep_images=True``), so that callers need not decode it again.
    image: Image.Image | None = None
    #: For the most anomalous patches (when asked for), the nearest normal patches of the training images.
    evidence: list[Evidence] = field(default_factory=list)

    def decide(self, threshold: float | None, pixel_threshold: float | None) -> "Prediction":
        """Set :attr:`is_anomalous` and :attr:`mask` from the thresholds (left ``None`` without them)."""
        self.is_anomalous = is_anomalous(self.score, threshold)
        self.mask = defect_mask(self.anomaly_map, pixel_threshold)
        return self
