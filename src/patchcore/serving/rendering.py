"""Heat maps, overlays and masks of a prediction as base64 PNG for JSON answers."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from ..engine.overlay import colourise, heat_map_overlay, model_heat_scale
from ..engine.prediction import Prediction
from ..engine.scoring import resize_bilinear


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_outputs(prediction: Prediction, photo: Image.Image, model, max_side: int,
                   want_map: bool, want_overlay: bool, want_mask: bool) -> dict[str, Any]:
    """The requested pictures of ``prediction`` (scaled so that no side exceeds ``max_side``).

    Heat maps use the model's fixed colour scale (:func:`~patchcore.engine.overlay.heat_scale`); the mask marks pixels at
    or above the model's pixel threshold (``None`` when it has none).
    """
    pixel_map = prediction.anomaly_map  # at the photo's own size
    pixel_threshold = model.pixel_threshold_
    height, width = pixel_map.shape
    factor = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    display = pixel_map if size == (width, height) else resize_bilinear(pixel_map, (size[1], size[0]))
    scaled = photo if photo.size == size else photo.resize(size, Image.BILINEAR)  # a JPEG may be decoded smaller
    low, high = model_heat_scale(model)
    result: dict[str, Any] = {"map_scale": {"low": low, "high": high, "fixed": True},
                              "map_width": display.shape[1], "map_height": display.shape[0]}
    if want_map:
        result["anomaly_map_png"] = png_base64(Image.fromarray(colourise(display, low, high), mode="RGB"))
    if want_overlay:
        result["overlay_png"] = png_base64(heat_map_overlay(scaled, display, low, high))
    if want_mask:
        result["mask_png"] = (None if pixel_threshold is None else
                              png_base64(Image.fromarray(np.where(display >= pixel_threshold, 255, 0).astype(np.uint8), mode="L")))
    return result
