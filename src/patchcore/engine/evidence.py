"""Pictures of evidence: an anomalous patch beside the nearest normal patch it was measured against."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..errors import ImageLoadError
from .geometry import photo_size
from .images import read_image
from .overlay import evidence_pair, scale_box
from .prediction import Evidence


def training_photo(name: str) -> Image.Image | None:
    """The training photo an evidence item names, if it is a file that can still be read."""
    if name.startswith("<") or not Path(name).is_file():
        return None
    try:
        return read_image(name)
    except ImageLoadError:
        return None


def evidence_picture(photo: Image.Image, item: Evidence, side: int = 128) -> Image.Image:
    """The crop pair of ``item``; ``photo`` is the test photo (possibly decoded at a reduced scale)."""
    original = photo_size(photo)
    box = scale_box(item.box, original, photo.size) if original != photo.size else item.box
    return evidence_pair(photo, box, training_photo(item.training_image), item.training_box, side)
