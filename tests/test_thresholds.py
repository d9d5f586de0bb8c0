"""Thresholds set from good images only, and the decision rule."""

from __future__ import annotations

import numpy as np
import pytest

from patchcore.engine.thresholds import defect_mask, flagging_threshold, is_anomalous, threshold_at_fpr


@pytest.mark.parametrize(
    "fpr, expected",
    [(0.0, 10), (0.05, 10), (0.1, 9), (0.15, 9), (0.2, 8), (0.29, 8), (0.3, 7), (1.0, 1)],
)
def test_threshold_at_fpr_rule(fpr, expected):
    scores = np.arange(1, 11, dtype=float)[::-1]  # order must not matter
    assert threshold_at_fpr(scores, fpr) == expected


def test_threshold_at_fpr_small_samples_and_ties():
    assert threshold_at_fpr([0.3, 0.7], 0.05) == 0.7  # n < 1/fpr: no false alarm allowed
    assert threshold_at_fpr([0.4], 0.5) == 0.4
    assert threshold_at_fpr([5, 5, 5, 1], 0.5) == 5  # ties: 0 above, never more than allowed


def test_threshold_at_fpr_property():
    rng = np.random.default_rng(2)
    for n in (1, 3, 17, 100):
        scores = rng.random(n)
        for fpr in (0.0, 0.01, 0.1, 0.25, 0.5, 0.99, 1.0):
            threshold = threshold_at_fpr(scores, fpr)
            assert np.mean(scores > threshold) <= fpr
            lower = scores[scores < threshold]
            if lower.size:  # the threshold is as low as allowed: the next value would exceed fpr
                assert np.mean(scores > lower.max()) > fpr


def test_threshold_at_fpr_errors():
    with pytest.raises(ValueError, match="no good scores"):
        threshold_at_fpr([], 0.1)
    with pytest.raises(ValueError, match="fpr must be in"):
        threshold_at_fpr([0.1], -0.1)
    with pytest.raises(ValueError, match="NaN"):
        threshold_at_fpr([0.1, float("inf")], 0.1)


def test_flagging_threshold_flags_at_most_the_allowed_share():
    scores = np.float32(np.random.default_rng(1).random(1000))
    threshold = flagging_threshold(scores, 0.01)
    assert np.sum(scores >= threshold) == 10  # 1% of 1000, with ">=" as the rule
    assert is_anomalous(float(threshold), threshold) is True and is_anomalous(0.0, threshold) is False
    assert is_anomalous(5.0, None) is None
    assert defect_mask(np.array([[1.0, 3.0]]), 2.0).tolist() == [[False, True]] and defect_mask(None, 2.0) is None
