"""Synthetic defects pasted into good photos, each with its pixel mask, for choosing settings
without a labelled defect set (issue 18).

Most users have good photos only. To compare settings they still need defective photos whose
defects are known pixel by pixel, so this module makes them from good ones: cut-and-paste
patches from other photos (CutPaste-style, rotated and scaled), thin scratches, spots, texture
changes and colour or brightness changes, at several sizes and contrasts.

Defects go **on the part**, not on the background: a background that nobody inspects tells
nothing about a setting. Where the part can be separated from its background in the photos
themselves (:class:`BackgroundColours`: colours seen on the photos' borders are background), the
defect is drawn inside that mask; where it cannot (a texture that fills the frame, a part that
touches every border), the whole photo is used and :class:`PartMask` says so.

Every defect's mask is exactly where the photo changed: pixels outside it are untouched, and
pixels inside changed by at least :data:`MIN_CHANGE` grey levels (holes filled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

#: The kinds of synthetic defect, in the order they are dealt out.
DEFECT_KINDS = ("cutpaste", "scratch", "spot", "texture", "colour")
#: Defect sizes: the defect's diameter as a share of the photo's shorter side.
DEFECT_SIZES = {"small": 0.02, "medium": 0.05, "large": 0.1}
#: Defect contrasts: how strongly the defect changes the pixels it covers (0-1).
DEFECT_CONTRASTS = {"low": 0.2, "high": 0.45}
#: Smallest change (grey levels, any channel) that counts as part of a defect.
MIN_CHANGE = 8
#: Side of the working image for estimating part masks (longer side, pixels).
MASK_WORK_SIDE = 128
#: Quantisation of colours for the border histogram (levels per channel).
COLOUR_LEVELS = 16
#: Share of the photo the part must cover for it to count as separated from its background.
PART_SHARE_RANGE = (0.01, 0.9)


@dataclass(frozen=True)
class PartMask:
    """Where the inspected part is in one photo (bool, photo size), and how that was found."""

    mask: np.ndarray
    found: bool  # False: no part could be separated, the whole photo is used
    note: str


@dataclass(frozen=True)
class SyntheticDefect:
    """A good photo with one synthetic defect: the photo (uint8 RGB), the defect's mask (bool)
    and what was drawn."""

    image: np.ndarray
    mask: np.ndarray
    kind: str
    size: str
    contrast: str


def _as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 photo, got an array of shape {array.shape} and type {array.dtype}")
    return array


def _work_image(image: np.ndarray) -> np.ndarray:
    """The photo shrunk so that its longer side is :data:`MASK_WORK_SIDE` (box filter: noise averages out)."""
    height, width = image.shape[:2]
    scale = MASK_WORK_SIDE / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BOX))


def _colour_bins(image: np.ndarray) -> np.ndarray:
    step = 256 // COLOUR_LEVELS
    q = image.astype(np.int64) // step
    return (q[..., 0] * COLOUR_LEVELS + q[..., 1]) * COLOUR_LEVELS + q[..., 2]


def _border(shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    frame = max(2, round(0.04 * min(height, width)))
    border = np.ones(shape, bool)
    border[frame:-frame, frame:-frame] = False
    return border


class BackgroundColours:
    """The colours of the photos' borders, learnt from good photos: what the background looks like.

    A photo's part is then every region whose colours are rare on the borders (histogram
    back-projection on a 16-level-per-channel colour cube, each bin widened by one neighbour so
    that small changes of light do not count), with holes filled and specks removed. Shadows of
    the part's own colour family may count as part; a part that touches every border, or a
    texture that fills the frame, leaves no part (the whole photo is used instead).
    """

    def __init__(self, histogram: np.ndarray, threshold: float) -> None:
        self.histogram = histogram
        self.threshold = threshold

    @classmethod
    def from_images(cls, images: Sequence[np.ndarray | Image.Image]) -> "BackgroundColours":
        counts = np.zeros(COLOUR_LEVELS**3, dtype=np.float64)
        for image in images:
            work = _work_image(_as_rgb(image))
            counts += np.bincount(_colour_bins(work)[_border(work.shape[:2])], minlength=COLOUR_LEVELS**3)
        if not counts.any():
            raise ValueError("no images to learn the background from")
        cube = counts.reshape((COLOUR_LEVELS,) * 3) / counts.sum()
        histogram = ndimage.maximum_filter(cube, size=3, mode="constant").ravel()
        # Background: colours as common as those of 99% of the border pixels.
        border_values = np.repeat(histogram, counts.astype(np.int64))
        threshold = float(np.quantile(border_values, 0.01)) if border_values.size else 0.0
        return cls(histogram, threshold)

    def part_mask(self, image: np.ndarray | Image.Image) -> PartMask:
        """The part in ``image``: the regions whose colours are rare on the good photos' borders."""
        image = _as_rgb(image)
        height, width = image.shape[:2]
        work = _work_image(image)
        foreground = self.histogram[_colour_bins(work)] < self.threshold
        foreground = ndimage.binary_opening(foreground, iterations=1)
        foreground = ndimage.binary_fill_holes(foreground)
        labels, count = ndimage.label(foreground)
        if count:
            sizes = np.bincount(labels.ravel())[1:]
            keep = np.flatnonzero(sizes >= max(4, 0.002 * foreground.size)) + 1
            foreground = np.isin(labels, keep)
        share = float(foreground.mean())
        low, high = PART_SHARE_RANGE
        if not low <= share <= high:
            why = "no region differs in colour from the photos' borders" if share < low else \
                "the part's colours fill the photo"
            return PartMask(np.ones((height, width), bool), False,
                            f"whole photo: no part separated from the background ({why}, {100 * share:.1f}% of the photo)")
        full = Image.fromarray(foreground.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
        return PartMask(np.asarray(full) >= 128, True, f"part: {100 * share:.0f}% of the photo, by its colours against the borders'")


def part_masks(images: Sequence[np.ndarray], background: BackgroundColours | None = None) -> list[PartMask]:
    """Each photo's part mask, the background learnt from these photos unless given."""
    background = background or BackgroundColours.from_images(images)
    return [background.part_mask(image) for image in images]


# -- drawing ---------------------------------------------------------------------------------


def _blob(shape: tuple[int, int], centre: tuple[float, float], radius: float, rng: np.random.Generator,
          softness: float = 0.0) -> np.ndarray:
    """An irregular, roughly elliptical blob as weights in [0, 1] (soft edges when ``softness`` > 0)."""
    height, width = shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ratio = rng.uniform(0.45, 1.0)
    dy, dx = y - centre[0], x - centre[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (radius * ratio)
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=max(1.0, radius / 2))
    noise *= 0.35 / max(float(np.abs(noise).max()), 1e-6)
    distance = np.hypot(u, v) + noise
    if softness <= 0:
        return (distance < 1.0).astype(np.float32)
    return np.clip((1.0 - distance) / softness, 0.0, 1.0)


def _window(centre: tuple[int, int], half: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return (slice(max(0, centre[0] - half), min(shape[0], centre[0] + half + 1)),
            slice(max(0, centre[1] - half), min(shape[1], centre[1] + half + 1)))


def _scratch(shape: tuple[int, int], centre: tuple[int, int], length: float, width: int,
             rng: np.random.Generator) -> np.ndarray:
    """A thin, slightly curved line through ``centre`` as weights 0/1."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([-direction[1], direction[0]])
    bend = rng.uniform(-0.25, 0.25) * length
    points = []
    for t in np.linspace(-0.5, 0.5, 24):
        offset = bend * (1 - (2 * t) ** 2)  # a parabola: the line bows a little
        row, col = np.array(centre) + t * length * direction + offset * normal
        points.append((float(col), float(row)))
    ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _cut_paste(target_shape: tuple[int, int], centre: tuple[int, int], donor: np.ndarray, donor_part: np.ndarray,
               side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch of ``donor`` (from inside its part), scaled and rotated, placed at ``centre``: the
    new pixels (float, photo size) and their weights (0/1)."""
    side = max(3, int(side * rng.uniform(0.8, 1.25)))
    rows, cols = np.nonzero(donor_part)
    pick = rng.integers(len(rows))
    top = int(np.clip(rows[pick] - side // 2, 0, max(0, donor.shape[0] - side)))
    left = int(np.clip(cols[pick] - side // 2, 0, max(0, donor.shape[1] - side)))
    patch = Image.fromarray(donor[top : top + side, left : left + side])
    scale = rng.uniform(0.8, 1.25)
    patch = patch.resize((max(2, round(patch.width * scale)), max(2, round(patch.height * scale))), Image.BILINEAR)
    angle = float(rng.uniform(0, 360))
    alpha = Image.new("L", patch.size, 255).rotate(angle, resample=Image.NEAREST, expand=True)
    patch = patch.rotate(angle, resample=Image.BILINEAR, expand=True)
    pixels = np.zeros(target_shape + (3,), np.float32)
    weights = np.zeros(target_shape, np.float32)
    top, left = centre[0] - patch.height // 2, centre[1] - patch.width // 2
    rows_to = slice(max(0, top), min(target_shape[0], top + patch.height))
    cols_to = slice(max(0, left), min(target_shape[1], left + patch.width))
    rows_from = slice(rows_to.start - top, rows_to.stop - top)
    cols_from = slice(cols_to.start - left, cols_to.stop - left)
    pixels[rows_to, cols_to] = np.asarray(patch, np.float32)[rows_from, cols_from]
    weights[rows_to, cols_to] = (np.asarray(alpha)[rows_from, cols_from] > 0).astype(np.float32)
    gain = 1.0 + rng.uniform(-0.15, 0.15, size=3)  # colour jitter, as in CutPaste
    return np.clip(pixels * gain, 0, 255), weights


def draw_defect(image: np.ndarray, part: np.ndarray, kind: str, size: str, contrast: str, rng: np.random.Generator,
                donor: np.ndarray | None = None, donor_part: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One attempt at a ``kind`` defect of ``size`` and ``contrast`` on the part of ``image``: the
    new photo and the mask of what changed (possibly empty: the caller tries again)."""
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    height, width = image.shape[:2]
    rows, cols = np.nonzero(part)
    if not len(rows):
        raise ValueError("the part mask is empty")
    pick = rng.integers(len(rows))
    centre = (int(rows[pick]), int(cols[pick]))
    diameter = max(4.0, DEFECT_SIZES[size] * min(height, width))
    strength = DEFECT_CONTRASTS[contrast]
    original = image.astype(np.float32)
    # Work in a window around the defect: a defect is small, a photo may be large.
    half = int(diameter * 2.5) + 4
    window = _window(centre, half, (height, width))
    local = original[window]
    local_centre = (centre[0] - window[0].start, centre[1] - window[1].start)
    shape = local.shape[:2]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if kind == "scratch":
        line_width = max(1, round(0.003 * min(height, width)))
        weights = _scratch(shape, local_centre, diameter * rng.uniform(2.0, 4.0), line_width, rng)
        target = np.clip(local + sign * 255 * min(1.0, 1.5 * strength), 0, 255) if sign > 0 else local * (1 - min(1.0, 1.5 * strength))
    elif kind == "spot":
        weights = _blob(shape, local_centre, diameter / 2, rng, softness=0.3)
        if rng.random() < 0.5:
            target = local * (1 - 1.5 * strength) if sign < 0 else local + (255 - local) * 1.5 * strength
        else:
            colour = rng.uniform(0, 255, size=3).astype(np.float32)
            target = local * (1 - 2 * strength) + colour * 2 * strength
        target = np.clip(target, 0, 255)
    elif kind == "texture":
        weights = _blob(shape, local_centre, diameter / 2, rng)
        blurred = ndimage.gaussian_filter(local, sigma=(max(1.0, diameter / 8), max(1.0, diameter / 8), 0))
        grain = rng.normal(0, 255 * strength / 2, size=shape)[..., None]
        target = np.clip(blurred + grain, 0, 255)
    elif kind == "colour":
        weights = _blob(shape, local_centre, diameter / 2, rng, softness=0.6)
        gain = 1.0 + strength * rng.uniform(-1, 1, size=3) + sign * strength * 0.5
        target = np.clip(local * gain, 0, 255)
    else:  # cutpaste
        if donor is None:
            donor, donor_part = image, part
        pixels, weights = _cut_paste(shape, local_centre, donor, donor_part if donor_part is not None else
                                     np.ones(donor.shape[:2], bool), int(diameter), rng)
        target = pixels
    weights = weights * part[window]
    blended = np.rint(local * (1 - weights[..., None]) + target * weights[..., None]).astype(np.uint8)
    changed = np.abs(blended.astype(np.int16) - image[window].astype(np.int16)).max(axis=2) >= MIN_CHANGE
    changed = ndimage.binary_fill_holes(changed) & part[window]
    out = image.copy()
    out[window] = np.where(changed[..., None], blended, image[window])
    mask = np.zeros((height, width), bool)
    mask[window] = changed
    return out, mask


def make_defect(image: np.ndarray, part: np.ndarray, kind: str, size: str, contrast: str, rng: np.random.Generator,
                donor: np.ndarray | None = None, donor_part: np.ndarray | None = None,
                attempts: int = 12) -> SyntheticDefect:
    """A ``kind`` defect on the part of ``image``, placed again (up to ``attempts`` times) where
    it would change too few pixels (e.g. a blur on a flat region): the attempt that changed most."""
    image = _as_rgb(image)
    expected = max(4.0, (DEFECT_SIZES[size] * min(image.shape[:2])) ** 2 * (0.05 if kind == "scratch" else 0.3))
    best: tuple[np.ndarray, np.ndarray] | None = None
    for _ in range(attempts):
        out, mask = draw_defect(image, part, kind, size, contrast, rng, donor, donor_part)
        if best is None or mask.sum() > best[1].sum():
            best = (out, mask)
        if mask.sum() >= expected:
            break
    assert best is not None
    if not best[1].any():
        raise ValueError(f"could not draw a visible {kind} defect on this photo's part")
    return SyntheticDefect(best[0], best[1], kind, size, contrast)


def defect_plan(count: int, kinds: Sequence[str] = DEFECT_KINDS) -> list[tuple[str, str, str]]:
    """(kind, size, contrast) for ``count`` photos: every kind in turn, sizes and contrasts
    cycling under them (3 sizes x 2 contrasts: every pair once in 6 rounds), so that a set of 5
    has every kind and 30 every combination."""
    sizes, contrasts = list(DEFECT_SIZES), list(DEFECT_CONTRASTS)
    plan = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        round_ = i // len(kinds)
        plan.append((kind, sizes[round_ % len(sizes)], contrasts[round_ % len(contrasts)]))
    return plan


def synthesize_defects(images: Sequence[np.ndarray], seed: int = 0, kinds: Sequence[str] = DEFECT_KINDS,
                       background: BackgroundColours | None = None,
                       per_photo: int = 1) -> tuple[list[SyntheticDefect], list[PartMask]]:
    """``per_photo`` synthetic defects on each good photo, each on its own copy (photo ``p``'s at
    ``p * per_photo`` onwards; kinds, sizes and contrasts dealt in that order as :func:`defect_plan`),
    and each photo's part mask. Cut-and-paste patches come from the next photo in the list (from
    the same photo when there is only one). The same photos and seed give the same defects."""
    if per_photo < 1:
        raise ValueError(f"per_photo must be at least 1, got {per_photo}")
    photos = [_as_rgb(image) for image in images]
    masks = part_masks(photos, background)
    rng = np.random.default_rng(seed)
    defects = []
    for i, (kind, size, contrast) in enumerate(defect_plan(len(photos) * per_photo, kinds)):
        p = i // per_photo
        j = (p + 1) % len(photos)
        defects.append(make_defect(photos[p], masks[p].mask, kind, size, contrast, rng, photos[j], masks[j].mask))
    return defects, masks
