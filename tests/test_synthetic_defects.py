"""Synthetic defects: on the part (estimated from good photos), masks where the photo changed,
every kind, the same with the same seed."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from patchcore.evaluation.synthetic_defects import (DEFECT_CONTRASTS, DEFECT_KINDS, DEFECT_SIZES, MIN_CHANGE,
                                                    BackgroundColours, defect_plan, part_masks, synthesize_defects)

from conftest import product_image


def part_photo(rng: np.random.Generator, size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """A textured orange disc (the part, moved a little each time) on a plain, slightly noisy green
    background, and the disc's true mask."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 + rng.uniform(-6, 6, size=2)
    disc = np.hypot(y - centre[0], x - centre[1]) < size * 0.3
    phase = rng.uniform(0, 2 * np.pi, size=2)
    texture = 0.6 + 0.2 * np.sin(x * 0.9 + phase[0]) * np.cos(y * 0.9 + phase[1])
    part = np.stack([texture * 255, texture * 190, texture * 110], axis=-1)
    background = np.broadcast_to(np.array([40.0, 90.0, 50.0]), part.shape)
    photo = np.where(disc[..., None], part, background) + rng.normal(0, 3, part.shape)
    return np.clip(photo, 0, 255).astype(np.uint8), disc


@pytest.fixture(scope="module")
def photos() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(3)
    pairs = [part_photo(rng) for _ in range(12)]
    return [p for p, _ in pairs], [d for _, d in pairs]


def test_the_part_is_found_from_the_good_photos(photos):
    images, discs = photos
    for estimate, disc in zip(part_masks(images), discs):
        assert estimate.found and "part" in estimate.note
        iou = (estimate.mask & disc).sum() / (estimate.mask | disc).sum()
        assert iou > 0.9


def test_defects_land_inside_the_part_and_masks_are_the_changed_pixels(photos):
    images, discs = photos
    defects, masks = synthesize_defects(images, seed=1)
    for image, defect, part, disc in zip(images, defects, masks, discs):
        assert defect.mask.any()
        assert not (defect.mask & ~part.mask).any()  # inside the estimated part ...
        assert not (defect.mask & ~ndimage.binary_dilation(disc, iterations=2)).any()  # ... which is the real one
        change = np.abs(defect.image.astype(int) - image.astype(int)).max(axis=2)
        assert not change[~defect.mask].any()  # nothing changed outside the mask
        assert (change[defect.mask] >= MIN_CHANGE).mean() > 0.8  # and the mask is what changed
        assert not (ndimage.binary_fill_holes(defect.mask) & ~defect.mask).any()  # no holes


def test_every_kind_size_and_contrast_is_dealt():
    assert {kind for kind, _, _ in defect_plan(5)} == set(DEFECT_KINDS)
    assert len(set(defect_plan(30))) == len(DEFECT_KINDS) * len(DEFECT_SIZES) * len(DEFECT_CONTRASTS)


def test_every_kind_is_produced_and_sizes_grow(photos):
    images, _ = photos
    defects, _ = synthesize_defects(images[:10], seed=0)
    assert [d.kind for d in defects] == list(DEFECT_KINDS) * 2
    small = [d.mask.sum() for d in defects if d.size == "small" and d.kind != "scratch"]
    medium = [d.mask.sum() for d in defects if d.size == "medium" and d.kind != "scratch"]
    assert np.median(medium) > 2 * np.median(small)
    scratch = next(d for d in defects if d.kind == "scratch")
    rows, cols = np.nonzero(scratch.mask)
    extent = max(np.ptp(rows), np.ptp(cols)) + 1
    assert scratch.mask.sum() < 0.5 * extent**2  # thin: a line, not a blob


def test_the_same_seed_gives_the_same_defects(photos):
    images, _ = photos
    first, _ = synthesize_defects(images[:6], seed=7)
    again, _ = synthesize_defects(images[:6], seed=7)
    other, _ = synthesize_defects(images[:6], seed=8)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) for a, b in zip(first, again))
    assert not all(np.array_equal(a.mask, b.mask) for a, b in zip(first, other))


def test_without_a_separable_part_the_whole_photo_is_used():
    rng = np.random.default_rng(0)
    textures = [product_image(rng, 96) for _ in range(6)]  # a weave that fills the frame
    background = BackgroundColours.from_images(textures)
    estimate = background.part_mask(textures[0])
    assert not estimate.found and estimate.mask.all() and "whole photo" in estimate.note
    defects, _ = synthesize_defects(textures, seed=0)
    assert all(d.mask.any() for d in defects)


def test_several_defects_per_photo_each_on_its_own_copy(photos):
    images, _ = photos
    defects, masks = synthesize_defects(images[:4], seed=2, per_photo=3)
    assert len(defects) == 12 and len(masks) == 4
    for p, image in enumerate(images[:4]):
        copies = defects[3 * p : 3 * p + 3]
        assert len({d.kind for d in copies}) == 3
        for defect in copies:  # each copy differs from its own photo only inside its own mask
            change = np.abs(defect.image.astype(int) - image.astype(int)).max(axis=2)
            assert defect.mask.any() and not change[~defect.mask].any()
