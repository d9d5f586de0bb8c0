"""Metrics against hand-computed cases and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from patchcore.evaluation.metrics import (
    aupro,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_curve_points,
    pixel_metrics,
    roc_curve_points,
)

# --- hand-computed AUPRO case -------------------------------------------------------------
# Region A: the 2x2 block top left (4 px); region B: the single pixel bottom right. 11 normal px.
HAND_MASK = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 1],
    ]
)
HAND_MAP = np.array(
    [
        [0.9, 0.8, 0.6, 0.0],
        [0.5, 0.2, 0.3, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.7],
    ],
    dtype=np.float32,
)
# Sweeping the threshold t down (a pixel is anomalous when score >= t):
#   t     A found  B found  PRO = mean(A, B)        normal px >= t  FPR
#   0.9   1/4      0        0.125                   0               0
#   0.8   2/4      0        0.25                    0               0
#   0.7   2/4      1        0.75                    0               0
#   0.6   2/4      1        0.75                    1 (the 0.6)     1/11
#   0.5   3/4      1        0.875                   1               1/11
#   0.3   3/4      1        0.875                   2 (+ the 0.3)   2/11
#   0.2   4/4      1        1                       2               2/11
#   0.0   4/4      1        1                       11              1
# The curve is a staircase: PRO 0.75 on FPR [0, 1/11], 0.875 on [1/11, 2/11], 1 after 2/11.
# fpr_limit = 0.3:    area = 0.75/11 + 0.875/11 + 1 * (0.3 - 2/11) = 0.3 - 0.375/11
#                     normalised: (0.3 - 0.375/11) / 0.3 = 1 - 1.25/11
# fpr_limit = 1.5/11: area = 0.75/11 + 0.875 * 0.5/11 = 1.1875/11
#                     normalised: 1.1875 / 1.5
# fpr_limit = 1:      area = 0.75/11 + 0.875/11 + 9/11 = 10.625/11


@pytest.mark.parametrize(
    "limit, expected",
    [(0.3, 1 - 1.25 / 11), (1.5 / 11, 1.1875 / 1.5), (1.0, 10.625 / 11), (1 / 11, 0.75), (0.05, 0.75)],
)
def test_aupro_hand_computed_staircase(limit, expected):
    assert aupro([HAND_MASK], [HAND_MAP], fpr_limit=limit) == pytest.approx(expected, abs=1e-7)


def test_pro_curve_points_hand_computed():
    fpr, pro = pro_curve_points([HAND_MASK], [HAND_MAP])
    # Only the corners matter; collinear points may be present, so compare the curve by sampling.
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == 1 and pro[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    corners = {(round(f * 11, 9), round(p, 9)) for f, p in zip(fpr, pro)}
    assert {(0, 0.125), (0, 0.25), (0, 0.75), (1, 0.75), (1, 0.875), (2, 0.875), (2, 1.0), (11, 1.0)} <= corners


def test_aupro_tie_between_normal_and_anomalous_gives_diagonal():
    # One 1-px region scored 0.5, normals 0.5, 0, 0: at t = 0.5, PRO 1 and FPR 1/3 together,
    # so the curve runs diagonally (0, 0) -> (1/3, 1) -> (1, 1).
    # limit 1/6: PRO there is 0.5; area 0.5 * 1/6 * 0.5 = 1/24, normalised 0.25.
    # limit 1:   area 0.5 * 1/3 + 2/3 = 5/6.
    mask = np.array([[1, 0, 0, 0]])
    amap = np.array([[0.5, 0.5, 0.0, 0.0]])
    assert aupro([mask], [amap], fpr_limit=1 / 6) == pytest.approx(0.25)
    assert aupro([mask], [amap], fpr_limit=1.0) == pytest.approx(5 / 6)


def test_regions_are_8_connected_and_span_images():
    # Image 1: a diagonal pair (one region with 8-connectivity, two with 4); image 2: one pixel.
    first = np.zeros((4, 4), int)
    first[0, 0] = first[1, 1] = 1
    second = np.zeros((3, 3), int)
    second[2, 2] = 1
    map1 = np.zeros((4, 4), np.float32)
    map1[0, 0], map1[1, 1] = 0.9, 0.5
    map2 = np.zeros((3, 3), np.float32)
    map2[2, 2] = 0.5
    _, pro = pro_curve_points([first, second], [map1, map2])
    # At t = 0.9 half of the pair is found: PRO = (1/2 + 0) / 2 = 0.25 (4-connectivity: 1/3).
    assert 0.25 in np.round(pro, 12)
    assert not np.any(np.isclose(pro, 1 / 3))


def test_mask_values_other_than_one_count_as_anomalous():
    mask = (HAND_MASK * 255).astype(np.uint8)
    assert aupro([mask], [HAND_MAP]) == pytest.approx(aupro([HAND_MASK.astype(bool)], [HAND_MAP]))


def brute_force_aupro(masks, maps, limit):
    """Reference: loop over every distinct score as a threshold, then clip each segment at the limit."""
    regions = []
    for mask in masks:
        labelled, count = ndimage.label(mask != 0, structure=np.ones((3, 3)))
        regions.append([labelled == r for r in range(1, count + 1)])
    normal_total = sum(int((mask == 0).sum()) for mask in masks)
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        overlaps = [amap[region].__ge__(t).mean() for amap, rs in zip(maps, regions) for region in rs]
        false = sum(int(((mask == 0) & (amap >= t)).sum()) for mask, amap in zip(masks, maps))
        points.append((false / normal_total, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_case(seed, rounding):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(4):
        mask = ndimage.binary_dilation(rng.random((16, 16)) > 0.97, iterations=1)
        amap = rng.random((16, 16)) + 0.8 * mask  # informative but imperfect
        if rounding:
            amap = np.round(amap, 1)  # many ties, within and across classes
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    masks[0][:] = False  # a good image among them
    return masks, maps


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rounding", [False, True])
@pytest.mark.parametrize("limit", [0.01, 0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, rounding, limit):
    masks, maps = random_case(seed, rounding)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(brute_force_aupro(masks, maps, limit), abs=1e-9)


def test_aupro_with_threshold_grid_approximates_exact():
    masks, maps = random_case(7, rounding=False)
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=5000) == pytest.approx(exact, abs=0.01)
    coarse = aupro(masks, maps, num_thresholds=10)
    assert coarse == pytest.approx(exact, abs=0.03) and coarse != exact  # sampled, so close but not equal
    with pytest.raises(ValueError, match="num_thresholds"):
        aupro(masks, maps, num_thresholds=1)


def test_aupro_perfect_and_inverted():
    masks, maps = random_case(3, rounding=False)
    perfect = [m.astype(np.float32) for m in masks]
    inverted = [1.0 - p for p in perfect]
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, inverted) == pytest.approx(0.0)


def test_aupro_errors():
    empty = np.zeros((4, 4))
    full = np.ones((4, 4))
    with pytest.raises(ValueError, match="anomalous region"):
        aupro([empty], [np.random.rand(4, 4)])
    with pytest.raises(ValueError, match="normal pixels"):
        aupro([full], [np.random.rand(4, 4)])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([HAND_MASK], [HAND_MAP], fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([HAND_MASK], [HAND_MAP], fpr_limit=1.5)


# --- AUROC --------------------------------------------------------------------------------


def test_image_auroc_hand_computed():
    # Anomalous 0.35 beats normal 0.1 but not 0.4; anomalous 0.8 beats both: 3 of 4 pairs.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # A tie between classes counts half: pairs (0.5 vs 0.5) = 0.5, (0.5 vs 0.1) = 1 -> 0.75.
    assert image_auroc([0, 0, 1], [0.5, 0.1, 0.5]) == pytest.approx(0.75)


def test_image_auroc_perfect_and_inverted():
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.7, 0.9]
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, [-s for s in scores]) == 0.0


def test_image_auroc_errors():
    with pytest.raises(ValueError, match="both normal and anomalous.*all 3 are normal"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="all 2 are anomalous"):
        image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_roc_curve_points():
    fpr, tpr = roc_curve_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_pixel_auroc_hand_computed():
    # One anomalous pixel (0.5) against normals 0.6, 0.4, 0.1 in image 1 and 0.5 (tie), 0.2 in image 2:
    # wins 0.4, 0.1, 0.2 = 3, tie 0.5 = 0.5, loses 0.6 -> 3.5 / 5.
    masks = [np.array([[255, 0], [0, 0]], np.uint8), np.zeros((1, 2), bool)]
    maps = [np.array([[0.5, 0.6], [0.4, 0.1]]), np.array([[0.5, 0.2]])]
    assert pixel_auroc(masks, maps) == pytest.approx(3.5 / 5)


@pytest.mark.parametrize("rounding", [False, True])
def test_pixel_auroc_matches_sklearn(rounding):
    from sklearn.metrics import roc_auc_score

    masks, maps = random_case(4, rounding)
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_perfect_and_inverted():
    masks, _ = random_case(1, rounding=False)
    perfect = [m * 2.0 + 1.0 for m in masks]
    assert pixel_auroc(masks, perfect) == 1.0
    assert pixel_auroc(masks, [-p for p in perfect]) == 0.0


def test_pixel_auroc_errors_name_the_index():
    masks = [np.zeros((4, 4)), np.ones((4, 4))]
    with pytest.raises(ValueError, match="anomaly map 1 has shape \\(4, 5\\).*\\(4, 4\\)"):
        pixel_auroc(masks, [np.zeros((4, 4)), np.zeros((4, 5))])
    with pytest.raises(ValueError, match="2 masks but 1 anomaly maps"):
        pixel_auroc(masks, [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="mask 0 .* 2-D"):
        pixel_auroc([np.zeros(4)], [np.zeros(4)])
    with pytest.raises(ValueError, match="all 16 are normal"):
        pixel_auroc([np.zeros((4, 4))], [np.random.rand(4, 4)])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, [np.zeros((4, 4)), np.full((4, 4), np.nan)])


# --- F1 and thresholds --------------------------------------------------------------------


def test_f1_max_hand_computed():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]
    # t=0.9: P 1, R 1/3, F1 0.5; t=0.5: P 1/2, R 1/3, F1 0.4; t=0.4: P 2/3, R 2/3, F1 2/3;
    # t=0.3: P 3/4, R 1, F1 6/7 (best); t=0.2: P 3/5, R 1, F1 0.75; t=0.1: P 1/2, R 1, F1 2/3.
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.3)


def test_f1_max_matches_brute_force():
    rng = np.random.default_rng(5)
    labels = rng.random(60) < 0.3
    scores = np.round(rng.random(60) + 0.5 * labels, 1)
    best_f1, best_t = -1.0, None
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        f1 = 2 * tp / (predicted.sum() + labels.sum())
        if f1 > best_f1 + 1e-12:
            best_f1, best_t = f1, t
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(best_f1)
    predicted = scores >= threshold
    assert 2 * np.sum(predicted & labels) / (predicted.sum() + labels.sum()) == pytest.approx(f1)
    assert threshold == pytest.approx(best_t)


def test_f1_max_perfect_and_errors():
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, pytest.approx(0.8))
    with pytest.raises(ValueError, match="at least one anomalous"):
        f1_max([0, 0], [0.1, 0.2])


def test_pixel_metrics_f1_and_roc_match_brute_force():
    rng = np.random.default_rng(4)
    masks = [rng.random((12, 15)) < 0.15 for _ in range(3)]
    maps = [np.round(rng.random((12, 15)) + 0.6 * m, 2).astype(np.float32) for m in masks]  # rounding: ties
    result = pixel_metrics(masks, maps)
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        precision, recall = tp / predicted.sum(), tp / labels.sum()
        best = max(best, 0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    assert result["f1_max"] == pytest.approx(best)
    assert np.mean(labels[scores >= result["f1_threshold"]]) > labels.mean()
    from sklearn.metrics import roc_auc_score

    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    fpr, tpr = result["roc"]
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0 and np.all(np.diff(fpr) >= 0)


def test_pixel_scores_gathered_image_by_image_match_sklearn_also_after_more_images_arrive():
    from sklearn.metrics import roc_auc_score

    from patchcore.evaluation.metrics import PixelScores

    rng = np.random.default_rng(3)
    masks = [rng.random((20, 30)) < 0.1 for _ in range(4)]
    maps = [rng.random((20, 30)).astype(np.float32) + 0.5 * m for m in masks]
    pixels = PixelScores()
    for mask, amap in zip(masks[:2], maps[:2]):
        pixels.add(mask, amap)
    first = pixels.pixel_metrics()["auroc"]
    for mask, amap in zip(masks[2:], maps[2:]):
        pixels.add(mask, amap)
    expected = [roc_auc_score(np.concatenate([m.ravel() for m in masks[:n]]), np.concatenate([a.ravel() for a in maps[:n]]))
                for n in (2, 4)]
    assert first == pytest.approx(expected[0], abs=1e-12)
    assert pixels.pixel_metrics()["auroc"] == pytest.approx(expected[1], abs=1e-12)
    assert pixels.regions == sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_pixel_metrics_and_pro_curve_do_not_depend_on_the_chunk_size(monkeypatch, chunk):
    import patchcore.evaluation.metrics as metrics_module

    rng = np.random.default_rng(5)
    masks = [rng.random((16, 16)) < 0.2 for _ in range(3)]
    # Few distinct scores: runs of equal anomalous scores cross the chunk borders.
    maps = [np.round(rng.random((16, 16)) * 6 + 3 * m).astype(np.float32) for m in masks]
    whole = metrics_module.pixel_scores(masks, maps)
    expected, expected_pro = whole.pixel_metrics(curve_points=16), whole.pro_curve()
    monkeypatch.setattr(metrics_module, "METRIC_CHUNK", chunk)
    chunked = metrics_module.pixel_scores(masks, maps)
    got, got_pro = chunked.pixel_metrics(curve_points=16), chunked.pro_curve()
    assert got["auroc"] == expected["auroc"] and got["f1_max"] == expected["f1_max"]
    assert got["f1_threshold"] == expected["f1_threshold"]
    for a, b in [*zip(got["roc"], expected["roc"]), *zip(got_pro, expected_pro)]:
        assert np.array_equal(a, b)
