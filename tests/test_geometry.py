"""Whole-image inspection: any aspect ratio, mixed sizes in one fit, corners seen, tiles stitched."""

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import FAST, product_image
from patchcore import PatchCore
from patchcore.engine.backbones import Backbone
from patchcore.engine.embedding import PatchNetwork
from patchcore.engine.features import PatchFeatures
from patchcore.engine.tiling import TiledEmbedding
from patchcore.engine.geometry import parse_resize, tile_owner, tile_starts


def test_parse_resize_accepts_a_shorter_side_an_exact_size_or_native():
    assert parse_resize(256) == 256 and parse_resize("256") == 256
    assert parse_resize("384x256") == (384, 256) and parse_resize([384, 256]) == (384, 256)
    assert parse_resize(None) is None and parse_resize("none") is None and parse_resize(0) is None
    for bad in ("16", "12x400", "1x2x3"):
        with pytest.raises(ValueError):
            parse_resize(bad)


def test_tiles_cover_the_input_overlap_and_line_up_with_the_stride():
    starts = tile_starts(752, 256, 64, 16)
    assert starts[0] == 0 and starts[-1] == 752 - 256
    assert all(s % 16 == 0 for s in starts)
    assert all(b - a <= 256 - 64 for a, b in zip(starts, starts[1:]))  # neighbours share >= 64 px
    assert tile_starts(200, 256, 64, 16) == [0]
    owner = tile_owner(752 // 8, starts, 256 // 8, 8)
    # Every cell is owned by a tile that contains it, and ownership moves on monotonically.
    for cell, tile in enumerate(owner):
        assert starts[tile] // 8 <= cell < starts[tile] // 8 + 32
    assert np.all(np.diff(owner) >= 0)


class _LocalNetwork(nn.Module):
    """A stand-in backbone whose features depend only on nearby pixels (stride 8 and 16 stages)."""

    def forward(self, images):
        return [F.avg_pool2d(images, 8), F.avg_pool2d(images, 16)]


def test_tiled_features_equal_whole_image_features_for_a_local_network():
    network = PatchNetwork(Backbone(_LocalNetwork(), channels=[3, 3], strides=[8, 16]), PatchFeatures([3, 3], None, 3))
    whole = TiledEmbedding(network.numpy, network.stride, network.cell)
    tiled = TiledEmbedding(network.numpy, network.stride, network.cell, tile_size=128, tile_overlap=0.5)
    pixels = np.random.default_rng(0).random((2, 3, 256, 400), dtype=np.float32)
    expected = whole(pixels)
    stitched = tiled(pixels)
    assert stitched.shape == expected.shape == (2, 32, 50, 6)
    # Owned cells lie >= 32 px from a tile's inner borders, beyond this network's reach (3x3 of
    # stride-16 cells, then a bilinear resize): the stitched grid is the whole-image grid.
    np.testing.assert_allclose(stitched, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def wide_textures(tmp_path_factory):
    """Good 1200x400 textures, and one with a defect in the bottom-left corner."""
    rng = np.random.default_rng(3)
    good = [product_image(rng, (400, 1200)) for _ in range(4)]
    defect = product_image(rng, (400, 1200), defect=(330, 15, 50))  # rows 330-380, cols 15-65
    return good, defect


def test_a_defect_in_the_corner_of_a_wide_photo_is_found_whole_image_but_missed_by_the_crop(wide_textures):
    good, defective = wide_textures
    whole = PatchCore(**FAST, resize=256, coreset_ratio=0.25).fit(good[:3])
    prediction = whole.predict(defective)[0]
    assert prediction.anomaly_map.shape == (400, 1200)
    assert prediction.patch_scores.shape == (32, 96)  # 768x256 input, stride 8
    row, col = np.unravel_index(np.argmax(prediction.anomaly_map), prediction.anomaly_map.shape)
    assert 330 <= row < 380 and 15 <= col < 65
    assert prediction.score > 1.5 * whole.predict(good[3])[0].score

    paper = PatchCore(**FAST, coreset_ratio=0.25, resize=256, crop=224).fit(good[:3])
    cropped = paper.predict(defective)[0]
    row, col = np.unravel_index(np.argmax(cropped.anomaly_map), cropped.anomaly_map.shape)
    assert not (330 <= row < 380 and 15 <= col < 65)  # the crop never saw it
    assert cropped.score < 1.2 * paper.predict(good[3])[0].score


def test_training_images_of_different_sizes_and_shapes_fit_together(product_images, wide_textures):
    good, defective = wide_textures
    square = [np.asarray(Image.open(p)) for p in product_images["train"][:4]]  # 64x64 -> 256x256
    model = PatchCore(**FAST, coreset_ratio=0.5, resize=128).fit(good[:2] + square)
    # 1200x400 -> 384x128 (48x16 patches); 64x64 -> 128x128 (16x16 patches).
    assert model.n_training_images_ == 6
    assert model.n_training_patches_ == 2 * 48 * 16 + 4 * 16 * 16
    assert model.memory_bank_.shape[0] == int(np.ceil(0.5 * model.n_training_patches_))
    predictions = model.predict([defective, square[0]])
    assert predictions[0].anomaly_map.shape == (400, 1200) and predictions[1].anomaly_map.shape == (64, 64)


def test_tiled_anomaly_map_matches_the_untiled_one_away_from_tile_borders(wide_textures):
    good, defective = wide_textures
    untiled = PatchCore(**FAST, coreset_ratio=0.25, resize=256).fit(good[:3])
    tiled = PatchCore(**FAST, coreset_ratio=0.25, resize=256, tile_size=256, tile_overlap=0.5)
    tiled.fit(good[:3])
    expected = untiled.predict(defective)[0]
    stitched = tiled.predict(defective)[0]
    assert stitched.anomaly_map.shape == expected.anomaly_map.shape == (400, 1200)
    row, col = np.unravel_index(np.argmax(stitched.anomaly_map), stitched.anomaly_map.shape)
    assert 330 <= row < 380 and 15 <= col < 65
    # Real CNN features reach beyond any overlap, so "equal" is within a tolerance: the maps
    # agree closely, and the defect scores the same.
    a, b = expected.anomaly_map.ravel(), stitched.anomaly_map.ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.95
    assert np.median(np.abs(a - b)) < 0.05 * (a.max() - a.min())
    assert stitched.score == pytest.approx(expected.score, rel=0.1)


def test_cells_wholly_in_the_stride_padding_never_enter_the_bank_the_scores_the_maps_or_the_evidence():
    # 72x88 photos at their own size: lite0's stride 16 pads them to 80x96, a 10x12 grid of 8-px
    # cells of which the last row and column show only repeated border pixels.
    rng = np.random.default_rng(5)
    train = [product_image(rng, (72, 88)) for _ in range(6)]
    model = PatchCore(**FAST, resize=None, coreset_ratio=0.5).fit(train)
    assert model.n_training_patches_ == 6 * 9 * 11
    assert model.memory_bank_origin_[:, 1].max() <= 8 and model.memory_bank_origin_[:, 2].max() <= 10
    border_defect = product_image(rng, (72, 88), defect=(62, 78, 10))  # the bottom-right corner, to the edge
    clean = product_image(rng, (72, 88))
    found, calm = model.predict([border_defect, clean], evidence=2)
    assert found.patch_scores.shape == calm.patch_scores.shape == (9, 11)
    assert found.anomaly_map.shape == (72, 88)
    # With the default smoothing the defect keeps its place on the photo's edge and its strength.
    row, column = np.unravel_index(np.argmax(found.anomaly_map), found.anomaly_map.shape)
    assert row >= 60 and column >= 76
    assert found.score > 1.5 * calm.score
    assert all(item.row <= 8 and item.column <= 10 for item in found.evidence + calm.evidence)
