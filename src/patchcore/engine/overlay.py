"""Heat-map overlays: what a person looks at to see where a defect is."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .atomic_files import atomic_path
from .scoring import resize_bilinear


def _jet(levels: int = 256) -> np.ndarray:
    """The jet colour map (blue - cyan - yellow - red), as ``levels`` x 3 ``uint8`` RGB rows."""
    x = np.linspace(0.0, 1.0, levels)[:, None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return np.rint(rgb * 255).astype(np.uint8)


_JET = _jet()


def colourise(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """An RGB ``uint8`` heat map of ``anomaly_map`` on a fixed scale ``low`` (blue) .. ``high`` (red)."""
    span = max(high - low, 1e-12)
    levels = np.clip((anomaly_map - low) / span, 0.0, 1.0)
    return _JET[np.rint(levels * 255).astype(np.uint8)]


def heat_map_overlay(image: Image.Image, anomaly_map: np.ndarray, low: float, high: float, opacity: float = 0.5) -> Image.Image:
    """``image`` with its heat map blended over it (the map must have the image's size)."""
    if anomaly_map.shape != (image.height, image.width):
        raise ValueError(f"anomaly map of shape {anomaly_map.shape} does not fit an image of {image.width}x{image.height}")
    heat = Image.fromarray(colourise(anomaly_map, low, high), mode="RGB")
    return Image.blend(image.convert("RGB"), heat, opacity)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    """Two images next to each other on a white background."""
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    canvas.paste(left.convert("RGB"), (0, 0))
    canvas.paste(right.convert("RGB"), (left.width + gap, 0))
    return canvas


def heat_scale(normal_mean: float, normal_std: float, pixel_threshold: float | None = None) -> tuple[float, float]:
    """A fixed colour scale for a model's heat maps, the same for every image it scores.

    Blue is a typical good patch (the mean patch score of good training patches). With a pixel
    threshold, it sits in the middle of the scale (green) and red means "well above it"; without
    one, red is eight standard deviations above normal.
    """
    low = float(normal_mean)
    if pixel_threshold is not None and pixel_threshold > low:
        return low, low + 2.0 * (float(pixel_threshold) - low)
    return low, low + 8.0 * max(float(normal_std), 1e-12)


def evidence_pair(photo: Image.Image, box: tuple[int, int, int, int], training_photo: Image.Image | None,
                  training_box: tuple[int, int, int, int] | None, side: int = 128, gap: int = 6) -> Image.Image:
    """The anomalous patch (left) beside its nearest normal patch from the training images (right),
    each cropped from its photo at the photo's own resolution and shown ``side`` pixels high; the
    right half is grey when that training photo cannot be read any more."""

    def crop(image: Image.Image | None, region) -> Image.Image:
        if image is None or region is None:
            return Image.new("RGB", (side, side), (128, 128, 128))
        part = image.convert("RGB").crop(region)
        width = max(1, round(side * part.width / max(part.height, 1)))
        return part.resize((width, side), Image.NEAREST if part.height < side else Image.BILINEAR)

    left, right = crop(photo, box), crop(training_photo, training_box)
    canvas = Image.new("RGB", (left.width + gap + right.width, side), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def scale_box(box: tuple[int, int, int, int], from_size: tuple[int, int], to_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box in pixels of a (width, height) ``from_size`` image, in pixels of ``to_size`` (the same photo decoded smaller)."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return (int(box[0] * sx), int(box[1] * sy), max(int(box[0] * sx) + 1, round(box[2] * sx)),
            max(int(box[1] * sy) + 1, round(box[3] * sy)))


def model_heat_scale(model) -> tuple[float, float]:
    """:func:`heat_scale` of a fitted (or exported) model: its normal scale and pixel threshold."""
    return heat_scale(model.normal_patch_score_mean_, model.normal_patch_score_std_, model.pixel_threshold_)


def overlay_beside_photo(photo: Image.Image, anomaly_map: np.ndarray, low: float, high: float) -> Image.Image:
    """The photo beside its heat-map overlay. A map at the photo's original size is resized to a
    photo decoded smaller (a JPEG read at the scale the network needed)."""
    if anomaly_map.shape != (photo.height, photo.width):
        anomaly_map = resize_bilinear(anomaly_map, (photo.height, photo.width))
    return side_by_side(photo, heat_map_overlay(photo, anomaly_map, low, high))


def save_png(image: Image.Image, path) -> None:
    """Write a picture as PNG at zlib level 1: a 1808x900 overlay encodes in 86 ms instead of
    344 ms at Pillow's default level 6, for 20% more bytes (writing overlays was most of
    ``predict``'s time per photo). Written whole or not at all."""
    with atomic_path(path) as temporary:  # a run stopped mid-write leaves no truncated picture
        image.save(temporary, format="PNG", compress_level=1)
