import math

import numpy as np
import pytest

from patchcore.engine.geometry import Placement
from patchcore.engine.scoring import anomaly_map, reweighted_image_score
from patchcore.engine.search import MemoryBankIndex


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_exact_search_returns_l2_distances(backend):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(5000, 24)).astype(np.float32)
    queries = rng.normal(size=(300, 24)).astype(np.float32)
    index = MemoryBankIndex(bank, backend, block_size=64)  # several blocks of query rows for numpy
    distances, indices = index.search(queries, k=3)
    brute = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1))
    expected = np.argsort(brute, axis=1)[:, :3]
    assert np.array_equal(indices, expected)
    assert np.allclose(distances, np.take_along_axis(brute, expected, 1), atol=1e-4)


def test_eq7_reweighting_by_hand():
    # Bank on a line; the test patch at x=10 is matched to the bank vector at 4 (distance 6).
    bank = np.array([[0.0], [1.0], [2.0], [4.0]], np.float32)
    index = MemoryBankIndex(bank)
    patches = np.array([[0.5], [10.0]], np.float32)
    scores = np.array([0.5, 6.0])
    nearest = np.array([0, 3])
    # b = 2 neighbours of m* = {4 (itself), 2}: distances from the patch 6 and 8.
    weight = 1 - math.exp(6) / (math.exp(6) + math.exp(8))
    assert reweighted_image_score(scores, nearest, patches, index, 2) == pytest.approx(weight * 6)
    assert reweighted_image_score(scores, nearest, patches, index, 1) == 6.0


def test_anomaly_map_has_the_image_size_and_keeps_the_defect_in_place():
    grid = np.zeros((28, 28), np.float32)
    grid[7, 21] = 10.0  # top right quadrant of the crop
    # A 900x900 image seen through a centred crop of 800x800 original pixels, 224x224 at the network.
    placement = Placement((900, 900), (50.0, 50.0, 850.0, 850.0), (224, 224), (224, 224), 8)
    heat = anomaly_map(grid, placement, sigma=4.0)
    assert heat.shape == (900, 900) and heat.dtype == np.float32
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    # patch (7, 21) centre in crop pixels: (7.5 * 8, 21.5 * 8) -> image coordinates.
    assert abs(row - (50 + 60 * 800 / 224)) < 8 and abs(col - (50 + 172 * 800 / 224)) < 8
    assert heat[0, 0] == pytest.approx(heat[60, 60], abs=1e-3)  # border values extend outside the box
    plain = anomaly_map(grid, Placement((300, 300), (0, 0, 300, 300), (224, 224), (224, 224), 8), sigma=0)
    assert plain.shape == (300, 300) and plain.max() <= 10.0


def test_anomaly_map_of_a_padded_whole_image_input_covers_every_pixel():
    # 1200x400 photo at shorter side 256 -> 768x256, no padding; 250x100 -> 640x256 padded to 640x256.
    grid = np.zeros((32, 96), np.float32)
    grid[30, 2] = 5.0  # near the bottom-left corner
    placement = Placement((400, 1200), (0, 0, 1200, 400), (256, 768), (256, 768), 8)
    heat = anomaly_map(grid, placement, sigma=4.0)
    assert heat.shape == (400, 1200)
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(row - 30.5 * 8 * 400 / 256) < 8 and abs(col - 2.5 * 8 * 1200 / 768) < 8


def test_maps_are_made_from_the_photos_cells_only_and_padding_never_reaches_them():
    # 360 px of photo padded to 384: the grid's last three columns (45-47) lie wholly in the padding.
    padded = Placement((256, 360), (0, 0, 360, 256), (256, 360), (256, 384), 8)
    assert padded.grid_size == (32, 45)  # column 44 covers photo pixels 352-359: it stays
    with pytest.raises(ValueError, match="do not match"):
        anomaly_map(np.zeros((32, 48), np.float32), padded, sigma=4.0)
    # A clean photo stays exactly flat to its border with the default smoothing: nothing beyond the
    # photo is averaged in (zeros or padding scores would pull the border down or up).
    assert np.allclose(anomaly_map(np.ones((32, 45), np.float32), padded, sigma=4.0), 1.0, atol=1e-6)
    # A defect on the photo's border keeps its strength there instead of being spread into padding.
    border = np.ones((32, 45), np.float32)
    border[10:14, 44] = 5.0
    heat = anomaly_map(border, padded, sigma=4.0)
    inner = np.ones((32, 45), np.float32)
    inner[10:14, 20] = 5.0
    assert np.unravel_index(np.argmax(heat), heat.shape)[1] >= 352  # the peak is on the border
    assert heat.max() >= anomaly_map(inner, padded, sigma=4.0).max() - 1e-6


def test_search_rejects_an_empty_bank():
    with pytest.raises(ValueError, match="non-empty"):
        MemoryBankIndex(np.zeros((0, 4), np.float32))
