"""From a photo to the network's input and back: resize, optional centre crop, pad, tiles.

The network sees the whole photo by default, its aspect ratio kept: the shorter side is resized
to ``resize`` pixels (or the photo to an exact ``(width, height)``, or left at its own size), and
the right and bottom edges are padded by repeating the last row/column up to a multiple of the
backbone's stride, so that every stage's grid divides evenly (a 1500x1000 photo at 256 becomes
384x256, a 48x32 grid of stride-8 patches). The paper's protocol, shorter side 256 and a centred
224x224 crop, is ``crop=224``.

A :class:`Placement` remembers where the input came from, so that a patch-score grid can be
turned into an anomaly map over every pixel of the original photo.

Large inputs can be cut into overlapping square tiles (:func:`tile_starts`): each tile runs
through the network on its own, and each patch of the full grid is taken from the tile in which
it lies most centrally, far from the tile's borders, so the stitched grid has no seams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Smallest input side the transform accepts (pixels).
MIN_SIDE = 32

@dataclass(frozen=True)
class Placement:
    """Where a network input came from in its original photo.

    ``box`` is the region of the photo the input shows (left, top, right, bottom, in original
    pixels; the whole photo unless cropped); ``content_size`` its (height, width) in input pixels;
    ``input_size`` the (height, width) fed to the network, padding included; ``cell`` the input
    pixels per patch of the network's feature grid.
    """

    image_size: tuple[int, int]
    box: tuple[float, float, float, float]
    content_size: tuple[int, int]
    input_size: tuple[int, int]
    cell: int

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the feature grid's cells that show some of the photo. The cells past
        them lie wholly in the stride padding (repeated border pixels, not photo): they never enter
        the memory bank, an image score, a map or the evidence."""
        return -(-self.content_size[0] // self.cell), -(-self.content_size[1] // self.cell)

    def patch_box(self, row: int, column: int, cell: int, margin: int = 1) -> tuple[int, int, int, int]:
        """The photo's pixels (left, top, right, bottom) under patch (row, column) of a grid of
        ``cell``-pixel cells, widened by ``margin`` cells (the neighbourhood the feature averages)."""
        left, top, right, bottom = self.box
        scale_x = (right - left) / self.content_size[1]
        scale_y = (bottom - top) / self.content_size[0]
        x0, x1 = (column - margin) * cell, (column + 1 + margin) * cell
        y0, y1 = (row - margin) * cell, (row + 1 + margin) * cell
        height, width = self.image_size
        return (max(0, int(np.floor(left + x0 * scale_x))), max(0, int(np.floor(top + y0 * scale_y))),
                min(width, int(np.ceil(left + x1 * scale_x))), min(height, int(np.ceil(top + y1 * scale_y))))

    @property
    def covers_image(self) -> bool:
        """Whether the network saw every pixel of the photo (no crop)."""
        height, width = self.image_size
        left, top, right, bottom = self.box
        return left <= 0.5 and top <= 0.5 and right >= width - 0.5 and bottom >= height - 0.5


def parse_resize(value) -> int | tuple[int, int] | None:
    """``256``, ``"256"``, ``"384x256"`` (width x height), ``(384, 256)``, ``None``/``"none"``/``0`` -> a resize setting."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "native", "0", "")):
        return None
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        if len(parts) == 1:
            return parse_resize(int(parts[0]))
        if len(parts) == 2:
            return parse_resize((int(parts[0]), int(parts[1])))
        raise ValueError(f"resize must be a shorter side like 256 or a size like 384x256, got {value!r}")
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"resize as a size needs (width, height), got {value!r}")
        width, height = (int(v) for v in value)
        if min(width, height) < MIN_SIDE:
            raise ValueError(f"resize must be at least {MIN_SIDE} pixels on each side, got {width}x{height}")
        return (width, height)
    side = int(value)
    if side == 0:
        return None
    if side < MIN_SIDE:
        raise ValueError(f"resize must be at least {MIN_SIDE} pixels, got {side}")
    return side


def resized_size(width: int, height: int, resize: int | tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) of a ``width`` x ``height`` photo after the resize rule."""
    if resize is None:
        return width, height
    if isinstance(resize, tuple):
        return resize
    scale = resize / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def padded(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return int(math.ceil(length / multiple)) * multiple


@dataclass(frozen=True)
class InputTransform:
    """Resize (shorter side, exact size, or none), optionally centre-crop, pad to ``stride``, normalise."""

    resize: int | tuple[int, int] | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: Inputs are padded to a multiple of this (the deepest feature stage's stride).
    stride: int = 1
    #: Input pixels per patch of the feature grid (the shallowest stage's stride); ``None``: the stride.
    cell: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", parse_resize(self.resize))
        if self.cell is None:
            object.__setattr__(self, "cell", self.stride)
        if self.crop is not None and self.crop < MIN_SIDE:
            raise ValueError(f"crop must be at least {MIN_SIDE} pixels, got {self.crop}")
        if isinstance(self.resize, int) and self.crop is not None and self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not be larger than resize ({self.resize})")
        if isinstance(self.resize, tuple) and self.crop is not None and self.crop > min(self.resize):
            raise ValueError(f"crop ({self.crop}) must not be larger than the resized image {self.resize[0]}x{self.resize[1]}")
        if self.stride < 1 or self.cell < 1 or self.stride % self.cell:
            raise ValueError(f"stride ({self.stride}) and cell ({self.cell}) must be positive, the stride a multiple of the cell")

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the network input made from a ``width`` x ``height`` photo."""
        if self.crop is not None:
            return padded(self.crop, self.stride), padded(self.crop, self.stride)
        new_width, new_height = resized_size(width, height, self.resize)
        return padded(new_height, self.stride), padded(new_width, self.stride)

    def resized_pixels(self, width: int, height: int) -> int:
        """Pixels of the photo after the resize (before a crop): the transform's largest image."""
        new_width, new_height = resized_size(width, height, self.resize)
        return new_width * new_height

    def needed_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the photo must at least have for this transform (its resized size)."""
        return resized_size(width, height, self.resize)

    def placement(self, width: int, height: int) -> Placement:
        """Where the input made from a ``width`` x ``height`` photo comes from (no pixels needed)."""
        new_width, new_height = resized_size(width, height, self.resize)
        scale_x, scale_y = new_width / width, new_height / height
        left = top = 0
        content_width, content_height = new_width, new_height
        if self.crop is not None:
            left = int(round((new_width - self.crop) / 2.0))
            top = int(round((new_height - self.crop) / 2.0))
            content_width = content_height = self.crop
        box = (left / scale_x, top / scale_y, (left + content_width) / scale_x, (top + content_height) / scale_y)
        content = (content_height, content_width)
        return Placement((height, width), box, content, (padded(content_height, self.stride), padded(content_width, self.stride)),
                         self.cell)

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, Placement]:
        """The normalised network input ``(3, H, W)`` float32 and where it came from.

        A photo decoded at a reduced scale carries its own size in ``image.info["original_size"]``;
        the placement refers to that size.
        """
        width, height = photo_size(image)
        new_size = resized_size(width, height, self.resize)
        resized = image.resize(new_size, Image.BILINEAR) if new_size != image.size else image
        scale_x, scale_y = resized.width / width, resized.height / height
        left = top = 0
        if self.crop is not None:
            if self.crop > min(resized.size):
                raise ValueError(f"image of {width}x{height} is smaller than the {self.crop} px crop")
            left = int(round((resized.width - self.crop) / 2.0))
            top = int(round((resized.height - self.crop) / 2.0))
            resized = resized.crop((left, top, left + self.crop, top + self.crop))
        box = (left / scale_x, top / scale_y, (left + resized.width) / scale_x, (top + resized.height) / scale_y)
        content = (resized.height, resized.width)
        input_size = (padded(content[0], self.stride), padded(content[1], self.stride))
        array = np.asarray(resized, dtype=np.uint8)
        if input_size != content:  # repeat the last row / column: no artificial edge for the network
            array = np.pad(array, ((0, input_size[0] - content[0]), (0, input_size[1] - content[1]), (0, 0)), mode="edge")
        mean = np.float32(255.0) * np.asarray(self.mean, dtype=np.float32)
        scale = np.float32(1.0) / (np.float32(255.0) * np.asarray(self.std, dtype=np.float32))
        # Channels first while still 8-bit (a quarter of the bytes to move), then two passes in
        # place: the same arithmetic, element by element, as (pixels - mean) * scale.
        pixels = np.ascontiguousarray(array.transpose(2, 0, 1)).astype(np.float32)
        pixels -= mean[:, None, None]
        pixels *= scale[:, None, None]
        return pixels, Placement((height, width), box, content, input_size, self.cell)


def tile_starts(length: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared.

    Offsets are multiples of ``multiple`` (the stride, so that every stage's grid lines up) and the
    last tile ends at ``length`` (``length`` and ``tile`` must be multiples of ``multiple``).
    """
    if tile >= length:
        return [0]
    step = max(multiple, (tile - overlap) // multiple * multiple)
    count = int(math.ceil((length - tile) / step)) + 1
    # Spread the tiles evenly between the first (0) and the last (length - tile) offset.
    last = length - tile
    starts = sorted({int(round(i * last / (count - 1) / multiple)) * multiple for i in range(count)})
    return starts


def tile_owner(grid_length: int, starts: list[int], tile_cells: int, cell: int) -> np.ndarray:
    """For each cell of a grid axis, the index of the tile in which it lies most centrally.

    ``starts`` are tile offsets in input pixels, ``tile_cells`` the tile's length in cells and
    ``cell`` the input pixels per cell.
    """
    centres = np.array([s / cell + tile_cells / 2.0 for s in starts])
    positions = np.arange(grid_length) + 0.5
    return np.argmin(np.abs(positions[:, None] - centres[None, :]), axis=1)


#: The scales at which a JPEG may be decoded (1/1, 1/2, 1/4, 1/8 of each side, rounded up).
DCT_SCALES = (1, 2, 4, 8)


def photo_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) of the photo ``image`` shows.

    That is its own size, or for a JPEG decoded at a reduced DCT scale the size
    :func:`~patchcore.engine.images.read_image` recorded in ``image.info["original_size"]``. A
    recorded size that ``image`` cannot be a reduction of is ignored: an image turned, cropped or
    resized after it was read keeps its ``info``, and is a photo of its own size.
    """
    original = image.info.get("original_size")
    if original is None:
        return image.size
    width, height = (int(side) for side in original)
    if any((-(-width // scale), -(-height // scale)) == image.size for scale in DCT_SCALES):
        return width, height
    return image.size
