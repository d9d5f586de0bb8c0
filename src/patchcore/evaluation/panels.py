"""Small per-image panels for reports: the photo with its ground truth, the heat map, the prediction."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from ..engine.overlay import colourise

#: Side of each panel of the overlay images (pixels, longer side).
PANEL_SIZE = 256

GROUND_TRUTH_COLOUR = (0, 230, 0)
PREDICTED_COLOUR = (255, 0, 255)


def panel_size(height: int, width: int, limit: int = PANEL_SIZE) -> tuple[int, int]:
    """(width, height) of a panel: the image scaled so that its longer side is at most ``limit``."""
    scale = min(1.0, limit / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size`` = (width, height), float32."""
    if (amap.shape[1], amap.shape[0]) == size:
        return np.asarray(amap, dtype=np.float32)
    return np.asarray(Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32)).resize(size, Image.BILINEAR), dtype=np.float32)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``size`` = (width, height)."""
    if (mask.shape[1], mask.shape[0]) == size:
        return np.asarray(mask, dtype=bool)
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0


def outline(mask: np.ndarray) -> np.ndarray:
    """A 2-pixel-wide outline of a bool mask."""
    if not mask.any():
        return mask
    edge = mask ^ ndimage.binary_erosion(mask, border_value=0)
    return ndimage.binary_dilation(edge)


def three_panels(photo: Image.Image, panel_map: np.ndarray, panel_mask: np.ndarray | None,
                 low: float, high: float, pixel_threshold: float) -> Image.Image:
    """The photo (ground truth outlined), the heat map over it, and the predicted region.

    ``photo`` must already have the panel's size (the map's).
    """
    height, width = panel_map.shape
    original = np.asarray(photo.convert("RGB"), dtype=np.uint8).copy()
    heat = colourise(panel_map, low, high)
    blended = (0.5 * original + 0.5 * heat).astype(np.uint8)
    predicted = original.copy()
    predicted[outline(panel_map >= pixel_threshold)] = PREDICTED_COLOUR
    if panel_mask is not None:
        truth = outline(panel_mask)
        for panel in (original, blended, predicted):
            panel[truth] = GROUND_TRUTH_COLOUR
    gap = 6
    canvas = Image.new("RGB", (3 * width + 2 * gap, height), "white")
    for k, panel in enumerate((original, blended, predicted)):
        canvas.paste(Image.fromarray(panel), (k * (width + gap), 0))
    return canvas
