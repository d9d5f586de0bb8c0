"""Training on turned and mirrored copies of the good photos (setting ``augment``), for parts that
lie at any orientation.

PatchCore's patch features are not rotation invariant: a part photographed turned by 90 degrees
has patches that no upright training photo holds, and is flagged whole. With ``augment`` the
memory bank is filled from copies of every training photo (and of every image taught in later):

============  ========================================================================
``none``      the photo only (the default)
``flip``      the photo, mirrored left-right, mirrored up-down, and turned 180 degrees:
              the symmetries of a rectangle, so every copy keeps the photo's shape (4)
``rot90``     turned by 0, 90, 180 and 270 degrees (4)
``dihedral``  the four turns of the photo and of its mirror image (8)
``rotate<N>`` ``N`` turns ``360/N`` degrees apart (``rotate8``: every 45 degrees; 2 to 72)
============  ========================================================================

The copies are made from each photo's network input as the photo is decoded
(:func:`~patchcore.engine.images.iterate_batches`, in its decoding threads), so no more than a
few photos' copies exist at a time and the fit stays within bounded memory. Turns by multiples of
90 degrees and mirrors are exact (pixels moved, not resampled). Other angles resample the input
bilinearly onto a canvas large enough to hold the whole turned photo; the canvas outside the
photo is filled with the median colour of the photo's border (a plausible background) and the
feature cells that are not wholly inside the turned photo never enter the memory bank
(:func:`valid_cells`; :class:`ValidRows` keeps only the others).

Every copy is recorded with the training image it was made from (``training_images_[i]["view"]``),
so evidence for a verdict maps the box of a bank vector from a copy back onto the pixels of the
training photo as it is on disk (:func:`training_patch_box`).

Torch-free: a saved model and an export apply the same augmentation when they are taught new
good images (:meth:`~patchcore.engine.detector.Detector.partial_fit`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import InputTransform, Placement, padded
from .patch_store import PatchStore

#: The named augmentations (``rotate<N>`` besides).
NAMED = ("none", "flip", "rot90", "dihedral")
#: The most turns ``rotate<N>`` takes.
MAX_TURNS = 72
_ROTATE = re.compile(r"rotate(\d+)")
#: (cos, sin) of the quarter turns, exactly.
_QUARTER = ((1, 0), (0, 1), (-1, 0), (0, -1))


@dataclass(frozen=True)
class View:
    """One copy of a photo: mirrored left-right first (``flip``), then turned counter-clockwise as
    shown on screen by ``angle`` degrees about its centre."""

    flip: bool = False
    angle: float = 0.0

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.angle == 0

    @property
    def quarter_turns(self) -> int | None:
        """``angle / 90`` when the angle is a multiple of 90 degrees (an exact turn), else ``None``."""
        turns = self.angle / 90.0
        return int(round(turns)) % 4 if abs(turns - round(turns)) < 1e-9 else None

    def record(self) -> dict[str, Any]:
        """What a model file keeps of the view (JSON)."""
        return {"flip": bool(self.flip), "angle": float(self.angle)}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> "View":
        return cls() if not record else cls(bool(record["flip"]), float(record["angle"]))

    def _cos_sin(self) -> tuple[float, float]:
        turns = self.quarter_turns
        if turns is not None:
            return _QUARTER[turns]
        radians = math.radians(self.angle)
        return math.cos(radians), math.sin(radians)

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the copy of a ``height`` x ``width`` image: the turned image's
        bounding box (the sides swapped by an odd number of quarter turns)."""
        turns = self.quarter_turns
        if turns is not None:
            return (width, height) if turns % 2 else (height, width)
        cos, sin = (abs(v) for v in self._cos_sin())
        return (int(math.ceil(width * sin + height * cos - 1e-6)), int(math.ceil(width * cos + height * sin - 1e-6)))

    def from_canvas(self, x: np.ndarray | float, y: np.ndarray | float, height: int, width: int):
        """The image's coordinates (x right, y down, pixel edges; the image spans [0, width] x
        [0, height]) of the copy's coordinates ``(x, y)``. Exact for quarter turns and mirrors."""
        canvas_height, canvas_width = self.canvas_size(height, width)
        cos, sin = self._cos_sin()
        dx, dy = np.subtract(x, canvas_width / 2.0), np.subtract(y, canvas_height / 2.0)
        # Turned back: the inverse of (dx, dy) -> (dx cos + dy sin, -dx sin + dy cos).
        u, v = dx * cos - dy * sin + width / 2.0, dx * sin + dy * cos + height / 2.0
        return (width - u if self.flip else u), v

    def to_canvas(self, x: np.ndarray | float, y: np.ndarray | float, height: int, width: int):
        """The inverse of :meth:`from_canvas`: where the image's point ``(x, y)`` lies on the copy."""
        canvas_height, canvas_width = self.canvas_size(height, width)
        cos, sin = self._cos_sin()
        x = np.subtract(width, x) if self.flip else x
        dx, dy = np.subtract(x, width / 2.0), np.subtract(y, height / 2.0)
        return dx * cos + dy * sin + canvas_width / 2.0, -dx * sin + dy * cos + canvas_height / 2.0

    def apply(self, pixels: np.ndarray, fill: np.ndarray | None = None) -> np.ndarray:
        """The copy of ``pixels`` ``(channels, height, width)``, float32. Quarter turns and mirrors
        move pixels; other angles resample bilinearly, the canvas outside the image set to ``fill``
        (one value per channel; default: the median of the image's border)."""
        out = pixels[:, :, ::-1] if self.flip else pixels
        turns = self.quarter_turns
        if turns is not None:
            return np.ascontiguousarray(np.rot90(out, turns, axes=(1, 2)), dtype=np.float32)
        from scipy.ndimage import affine_transform

        channels, height, width = pixels.shape
        canvas = self.canvas_size(height, width)
        fill = border_median(pixels) if fill is None else np.asarray(fill, dtype=np.float32)
        # Index coordinates (row, column) of pixel centres: edge coordinate = index + 0.5. The
        # mirror is already applied to `out`, so only the turn is undone here.
        cos, sin = self._cos_sin()
        turn = View(False, self.angle)
        x0, y0 = turn.from_canvas(0.5, 0.5, height, width)
        matrix = np.array([[cos, sin], [-sin, cos]])  # d(row, column) / d(row', column')
        offset = np.array([y0 - 0.5, x0 - 0.5])
        result = np.empty((channels, *canvas), dtype=np.float32)
        for channel in range(channels):
            affine_transform(np.ascontiguousarray(out[channel], dtype=np.float32), matrix, offset, output_shape=canvas,
                             output=result[channel], order=1, mode="constant", cval=float(fill[channel]))
        return result

    def valid_cells(self, height: int, width: int, cell: int) -> np.ndarray | None:
        """Which cells of the copy's feature grid (``cell`` pixels each, as many as cover the
        canvas) lie wholly inside the turned ``height`` x ``width`` image; ``None`` when every
        cell shows the image (no turn, mirrors and quarter turns: the canvas is the image)."""
        if self.quarter_turns is not None:
            return None
        canvas_height, canvas_width = self.canvas_size(height, width)
        rows, columns = -(-canvas_height // cell), -(-canvas_width // cell)
        y, x = np.mgrid[0 : rows + 1, 0 : columns + 1] * float(cell)
        u, v = self.from_canvas(x, y, height, width)
        slack = 1e-6 * max(height, width)
        inside = (u >= -slack) & (u <= width + slack) & (v >= -slack) & (v <= height + slack)
        # A cell is inside when its four corners are: the turned image is convex.
        return inside[:-1, :-1] & inside[1:, :-1] & inside[:-1, 1:] & inside[1:, 1:]


def border_median(pixels: np.ndarray) -> np.ndarray:
    """The median of each channel over the border pixels of ``pixels`` ``(channels, height, width)``."""
    border = np.concatenate([pixels[:, 0, :], pixels[:, -1, :], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    return np.median(border, axis=1).astype(np.float32)


def parse_augment(augment: str) -> tuple[View, ...]:
    """The views of an ``augment`` setting, the photo itself first (see the module's table)."""
    name = str(augment).strip().lower()
    if name == "none":
        return (View(),)
    if name == "flip":
        return (View(), View(True, 0.0), View(True, 180.0), View(False, 180.0))
    if name == "rot90":
        return tuple(View(False, angle) for angle in (0.0, 90.0, 180.0, 270.0))
    if name == "dihedral":
        return tuple(View(flip, angle) for flip in (False, True) for angle in (0.0, 90.0, 180.0, 270.0))
    match = _ROTATE.fullmatch(name)
    if match and 2 <= int(match.group(1)) <= MAX_TURNS:
        turns = int(match.group(1))
        return tuple(View(False, 360.0 * i / turns) for i in range(turns))
    raise ValueError(f"augment must be one of {', '.join(NAMED)} or rotate<N> (N turns 360/N degrees apart, "
                     f"2 <= N <= {MAX_TURNS}), got {augment!r}")


@dataclass(frozen=True, eq=False)
class ViewPlacement(Placement):
    """Where a copy's network input came from: the copy of the photo's input (``base``) by
    ``view``. ``content_size`` is the copy's canvas; :meth:`patch_box` gives boxes in the pixels
    of the photo itself (the copy's cells mapped back)."""

    view: View = View()
    base: Placement | None = None

    def valid_cells(self) -> np.ndarray | None:
        """:meth:`View.valid_cells` of the copy (``None``: every cell shows the photo)."""
        height, width = self.base.content_size
        return self.view.valid_cells(height, width, self.cell)

    def patch_box(self, row: int, column: int, cell: int, margin: int = 1) -> tuple[int, int, int, int]:
        """The photo's pixels (left, top, right, bottom) under the copy's patch (row, column),
        widened by ``margin`` cells: the bounding box of the patch turned back (exact for quarter
        turns and mirrors)."""
        canvas_height, canvas_width = self.content_size
        x0, x1 = max(0, (column - margin) * cell), min(canvas_width, (column + 1 + margin) * cell)
        y0, y1 = max(0, (row - margin) * cell), min(canvas_height, (row + 1 + margin) * cell)
        content_height, content_width = self.base.content_size
        u, v = self.view.from_canvas(np.array([x0, x1, x0, x1], float), np.array([y0, y0, y1, y1], float),
                                     content_height, content_width)
        u0, u1 = max(0.0, float(u.min())), min(float(content_width), float(u.max()))
        v0, v1 = max(0.0, float(v.min())), min(float(content_height), float(v.max()))
        left, top, right, bottom = self.base.box
        scale_x, scale_y = (right - left) / content_width, (bottom - top) / content_height
        height, width = self.image_size
        return (max(0, int(np.floor(left + u0 * scale_x))), max(0, int(np.floor(top + v0 * scale_y))),
                min(width, int(np.ceil(left + u1 * scale_x))), min(height, int(np.ceil(top + v1 * scale_y))))


def view_placement(base: Placement, view: View, stride: int) -> ViewPlacement:
    """The placement of ``view``'s copy of an input placed by ``base`` (padded to ``stride``)."""
    height, width = view.canvas_size(*base.content_size)
    return ViewPlacement(base.image_size, base.box, (height, width), (padded(height, stride), padded(width, stride)),
                         base.cell, view, base)


def valid_cells(placement: Placement) -> np.ndarray | None:
    """Which cells of an input's grid may enter the memory bank (``None``: all of them)."""
    return placement.valid_cells() if isinstance(placement, ViewPlacement) else None


def view_record(placement: Placement) -> dict[str, Any] | None:
    """What a training image's record keeps of the copy it is (``None``: the photo itself)."""
    if isinstance(placement, ViewPlacement) and not placement.view.is_identity:
        return placement.view.record()
    return None


class Augmenter:
    """Makes the copies of one network input (``augment`` parsed), in the decoding threads of
    :func:`~patchcore.engine.images.iterate_batches`: ``(pixels, placement)`` -> one
    ``(pixels, placement)`` per view, the input itself first and untouched."""

    def __init__(self, augment: str, stride: int) -> None:
        self.views = parse_augment(augment)
        self.stride = stride

    @property
    def copies(self) -> int:
        return len(self.views)

    @property
    def masks_cells(self) -> bool:
        """Whether some copy has cells outside the turned photo (angles other than quarter turns)."""
        return any(view.quarter_turns is None for view in self.views)

    def __call__(self, pixels: np.ndarray, placement: Placement) -> list[tuple[np.ndarray, Placement]]:
        height, width = placement.content_size
        content = pixels[:, :height, :width]
        fill = border_median(content) if self.masks_cells else None
        copies = []
        for view in self.views:
            if view.is_identity:
                copies.append((pixels, placement))
                continue
            turned = view.apply(content, fill)
            where = view_placement(placement, view, self.stride)
            padding = ((0, 0), (0, where.input_size[0] - turned.shape[1]), (0, where.input_size[1] - turned.shape[2]))
            if any(after for _, after in padding):  # as the photo's own input: repeat the last row / column
                turned = np.pad(turned, padding, mode="edge")
            copies.append((np.ascontiguousarray(turned), where))
        return copies


def augmenter(augment: str, transform: InputTransform) -> Augmenter | None:
    """The augmenter of an ``augment`` setting for inputs made by ``transform`` (``None`` for ``none``)."""
    views = parse_augment(augment)
    return None if len(views) == 1 else Augmenter(augment, transform.stride)


def training_patch_box(transform: InputTransform, training: dict[str, Any], row: int, column: int,
                       cell: int) -> tuple[int, int, int, int] | None:
    """The box, in the pixels of the training photo as it is on disk, of the patch (row, column)
    of a training image's record (``{"name", "size", "view"?}``): the copy's patch turned back."""
    if not training.get("size"):
        return None
    height, width = training["size"]
    base = transform.placement(width, height)
    view = View.from_record(training.get("view"))
    if view.is_identity:
        return base.patch_box(row, column, cell)
    return view_placement(base, view, transform.stride).patch_box(row, column, cell)


class ValidRows:
    """A :class:`PatchStore` of whole feature grids read as if it held only their valid cells.

    The fit stores each copy's grid whole (one append, as for a photo) with the mask of the cells
    that may enter the bank; rows are numbered over the valid cells only, so the coreset, the
    reference scores and teach-in never see the others. The valid cells of a grid row are kept as
    runs (start, length), a few numbers per grid row, not one per patch.
    """

    def __init__(self, width: int, directory: str | os.PathLike | None = None) -> None:
        self.store = PatchStore(width, directory=directory)
        self.width = width
        self._starts: list[np.ndarray] = []  # store row of each run
        self._lengths: list[np.ndarray] = []
        self._rows = 0
        self._image_starts: list[int] = []  # first valid row of each image
        self.image_sizes: list = []  # as PatchStore's
        self.image_views: list = []
        self.image_keys: list[tuple[int, int]] = []
        self.photo_count = 0
        self._index: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def image_names(self) -> list[str]:
        return self.store.image_names

    def __enter__(self) -> "ValidRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def __len__(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def append_image(self, name: str, grid: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add one copy's grid ``(rows, columns, width)``; ``valid`` marks the cells that count."""
        first = len(self.store)
        self.store.append_image(name, grid)
        flat = np.ones(grid.shape[0] * grid.shape[1], bool) if valid is None else np.asarray(valid, bool).ravel()
        if flat.size != grid.shape[0] * grid.shape[1]:
            raise ValueError(f"a mask of {np.shape(valid)} cells for a grid of {grid.shape[:2]}")
        steps = np.diff(np.concatenate([[0], flat.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(steps == 1), np.flatnonzero(steps == -1)
        self._starts.append(first + starts)
        self._lengths.append(ends - starts)
        self._image_starts.append(self._rows)
        self._rows += int(flat.sum())
        self._index = None

    def _runs(self) -> tuple[np.ndarray, np.ndarray]:
        if self._index is None:
            starts = np.concatenate(self._starts) if self._starts else np.empty(0, np.int64)
            lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int64)
            self._starts, self._lengths = [starts], [lengths]
            self._index = (np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), starts.astype(np.int64))
        return self._index

    def store_rows(self, rows: np.ndarray) -> np.ndarray:
        """The store's rows of valid rows ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        first, starts = self._runs()
        run = np.searchsorted(first, rows, side="right") - 1
        return starts[run] + rows - first[run]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Valid rows ``start:stop`` as float32 (one read of the store rows they span)."""
        start, stop = max(0, start), min(stop, self._rows)
        if stop <= start:
            return np.empty((0, self.width), np.float32)
        rows = self.store_rows(np.arange(start, stop))
        return self.store.read(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.store.take(self.store_rows(rows))

    def image_rows(self, image: int) -> tuple[int, int]:
        """The valid rows ``(start, stop)`` of the ``image``-th grid appended."""
        stop = self._image_starts[image + 1] if image + 1 < len(self._image_starts) else self._rows
        return self._image_starts[image], stop

    def origins(self, rows: np.ndarray) -> np.ndarray:
        """``(image index, row, column)`` of valid rows, as :meth:`PatchStore.origins`."""
        return self.store.origins(self.store_rows(rows))

    def image_grid(self, image: int) -> np.ndarray:
        """Image ``image``'s whole grid of patch features (valid cells or not), as stored."""
        return self.store.image_grid(image)
