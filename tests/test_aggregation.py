"""The image score's aggregation of patch scores (``aggregation``): computed by hand on a small grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import bank_only_detector, small_model_settings

from patchcore import PatchCore
from patchcore.engine.scoring import aggregated_image_score, parse_aggregation, reweighted_image_score, top_patches
from patchcore.engine.search import MemoryBankIndex

#: A bank on a line, and ten patches (a 2x5 grid) at known distances from it.
BANK = np.array([[0.0], [1.0], [2.0], [4.0], [10.0]], np.float32)
PATCHES = np.array([[0.0], [1.0], [2.0], [4.0], [10.0], [0.5], [13.0], [6.8], [16.0], [20.0]], np.float32)
SCORES = np.array([0, 0, 0, 0, 0, 0.5, 3, 2.8, 6, 10], np.float32)
NEAREST = np.array([0, 1, 2, 3, 4, 0, 4, 3, 4, 4])


def eq7(distance_to_match: float, distance_to_other: float) -> float:
    """Eq. 7's weight with two neighbours (m* and one more), by hand."""
    return 1 - math.exp(distance_to_match) / (math.exp(distance_to_match) + math.exp(distance_to_other))


def test_the_search_finds_what_the_table_says():
    distances, nearest = bank_only_detector(BANK).score_patches(PATCHES)
    np.testing.assert_allclose(distances, SCORES, atol=1e-3)
    assert nearest.tolist() == NEAREST.tolist()


@pytest.mark.parametrize("aggregation, expected", [
    ("max", 10.0), ("top1", 10.0), ("top3", (10 + 6 + 3) / 3), ("top5", (10 + 6 + 3 + 2.8 + 0.5) / 5),
    ("top10%", 10.0), ("top25%", (10 + 6 + 3) / 3),  # 10% of 10 patches: 1; 25%: 2.5, rounded up to 3
    ("top100%", 22.3 / 10), ("top50", 22.3 / 10),  # more than the patches: all of them
])
def test_plain_aggregations_by_hand(aggregation, expected):
    index = MemoryBankIndex(BANK)
    assert aggregated_image_score(SCORES, NEAREST, PATCHES, index, aggregation, reweight=False) == pytest.approx(expected)
    detector = bank_only_detector(BANK, aggregation=aggregation, reweight=False)
    assert detector.score_images([PATCHES])[0][2] == pytest.approx(expected, abs=1e-3)


def test_reweighted_aggregations_weight_each_top_patch_by_its_own_neighbourhood():
    index = MemoryBankIndex(BANK)
    # b = 2: m* and its nearest other bank vector. The patch at 20 (score 10) and at 16 (score 6)
    # are both matched to 10, whose other neighbour is 4 (distances 16 and 12); the patch at 13 to
    # 10 too (score 3; 9 from 4); the one at 6.8 to 4 (score 2.8), whose other neighbour is 2 (4.8 away).
    weighted = [eq7(10, 16) * 10, eq7(6, 12) * 6, eq7(3, 9) * 3, eq7(2.8, 4.8) * 2.8]
    assert aggregated_image_score(SCORES, NEAREST, PATCHES, index, "max", True, 2) == pytest.approx(weighted[0])
    assert aggregated_image_score(SCORES, NEAREST, PATCHES, index, "top2", True, 2) == pytest.approx(np.mean(weighted[:2]))
    assert aggregated_image_score(SCORES, NEAREST, PATCHES, index, "top4", True, 2) == pytest.approx(np.mean(weighted))
    # max re-weighted is the paper's eq. 7 to the bit; one neighbour means no re-weighting.
    assert (aggregated_image_score(SCORES, NEAREST, PATCHES, index, "max", True, 9)
            == reweighted_image_score(SCORES, NEAREST, PATCHES, index, 9))
    assert aggregated_image_score(SCORES, NEAREST, PATCHES, index, "top2", True, 1) == pytest.approx(8.0)


def test_a_detector_scores_several_images_at_once_as_each_alone():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 8)).astype(np.float32)
    images = [bank[rng.choice(300, 50)] + rng.normal(size=(50, 8)).astype(np.float32) * s for s in (0.1, 0.5, 2.0)]
    for aggregation in ("max", "top3", "top5%"):
        detector = bank_only_detector(bank, aggregation=aggregation, num_neighbours=4)
        together = detector.score_images(images)
        index = MemoryBankIndex(bank)
        for patches, (distances, nearest, score) in zip(images, together):
            assert score == detector.score_images([patches])[0][2]
            assert score == pytest.approx(aggregated_image_score(distances, nearest, patches, index, aggregation, True, 4))


def test_top_patches_are_the_highest_first_the_first_of_ties_first():
    scores = np.array([1.0, 5.0, 3.0, 5.0, 0.0])
    assert top_patches(scores, "max").tolist() == [1]
    assert top_patches(scores, "top3").tolist() == [1, 3, 2]
    assert top_patches(scores, "top40%").tolist() == [1, 3]
    for bad in ("top0", "mean", "top0%", "top101%", "max3"):
        with pytest.raises(ValueError, match="aggregation must be"):
            parse_aggregation(bad)


def test_a_fitted_model_scores_images_by_its_aggregation(product_images):
    model = PatchCore(**small_model_settings(aggregation="top3", reweight=False)).fit(product_images["train"][:6])
    for prediction in model.predict(product_images["defective"][:2]):
        assert prediction.score == pytest.approx(np.sort(prediction.patch_scores, axis=None)[-3:].mean(), rel=1e-6)
    with pytest.raises(ValueError, match="aggregation must be"):
        PatchCore(**small_model_settings(aggregation="mean")).fit(product_images["train"][:2])
