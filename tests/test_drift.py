"""Drift (:mod:`patchcore.station.drift`): the flagged share of the last N scores against the
false-positive rate the threshold was calibrated at, on generated score sequences."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from patchcore.engine.thresholds import flagging_threshold
from patchcore.station.drift import DriftSettings, Expected, drift_of, expected_flagged_share, quantile_name


def _calibrated(rng: np.random.Generator, rate: float = 0.01, images: int = 400) -> tuple[float, Expected]:
    """A threshold set as ``calibrate_threshold`` sets it, on good scores ~ N(1, 0.1)."""
    good = rng.normal(1.0, 0.1, images)
    source = f"{images} good images: image false-positive rate <= {rate}, pixel false-positive rate <= 0.001"
    return flagging_threshold(good, rate), expected_flagged_share(source)


def test_the_warning_appears_after_the_scores_shift_and_not_before():
    rng = np.random.default_rng(3)
    threshold, expected = _calibrated(rng)
    assert expected.share == pytest.approx(0.01)
    before = rng.normal(1.0, 0.1, 1000)  # as calibrated
    after = rng.normal(1.25, 0.1, 400)  # new light: a quarter or more of good photos now score above the threshold
    scores = np.concatenate([before, after])
    settings = DriftSettings(window=200, warn_multiple=3.0)
    figures = [drift_of(scores[: end + 1], threshold, expected, settings) for end in range(len(scores))]
    warned = [end for end, drift in enumerate(figures) if drift.warning is not None]
    assert warned and warned[0] >= len(before)  # never before the shift ...
    assert warned[0] < len(before) + 60  # ... and soon after it
    assert all(figures[end].warning for end in range(warned[0], len(scores)))  # and it stays
    calm, shifted = figures[len(before) - 1], figures[-1]
    assert calm.verdicts == shifted.verdicts == 200
    assert calm.flagged_share <= 3 * 0.01 < shifted.flagged_share
    assert shifted.flagged == int(np.count_nonzero(after[-200:] >= threshold))
    assert shifted.ratio == pytest.approx(shifted.flagged_share / 0.01)
    assert shifted.quantiles[0.5] == pytest.approx(np.median(after[-200:]))
    assert calm.quantiles[0.99] < shifted.quantiles[0.99]
    assert "times the 1% calibration expected" in shifted.warning


def test_few_verdicts_never_warn_and_a_model_without_threshold_flags_nothing():
    threshold, expected = 2.0, Expected(0.01, "calibrated")
    one_flag = drift_of([1.0, 3.0, 1.0], threshold, expected, DriftSettings(window=500))
    assert one_flag.flagged_share == pytest.approx(1 / 3) and one_flag.warning is None  # 3 photos say nothing
    small_window = drift_of([1.0, 3.0, 1.0], threshold, expected, DriftSettings(window=3))
    assert small_window.warning is not None  # a window of 3 asked for: 3 is enough
    unrated = drift_of([1.0, 3.0], None, Expected(None, "no threshold"))
    assert (unrated.flagged, unrated.flagged_share, unrated.warning) == (None, None, None)
    assert unrated.quantiles[0.5] == pytest.approx(2.0)
    empty = drift_of([], threshold, expected)
    assert (empty.verdicts, empty.flagged_share, empty.quantiles) == (0, None, {})


def test_the_expected_share_is_read_from_the_threshold_source():
    assert expected_flagged_share("200 good images: image false-positive rate <= 0.02, pixel false-positive rate <= "
                                  "0.001").share == pytest.approx(0.02)
    # Calibrated at rate 0 on 9 images: the threshold is the highest good score, exceeded by 1 in 10.
    floor = expected_flagged_share("9 good images: image false-positive rate <= 0.0, pixel false-positive rate <= 0.001")
    assert floor.share == pytest.approx(0.1) and "cannot promise" in floor.basis
    for source in (None, "user", "saved", "test"):
        assert expected_flagged_share(source).share is None
    assert drift_of([5.0] * 100, 1.0, expected_flagged_share("user")).warning is None  # nothing promised: no warning


def test_a_real_calibration_states_its_rate(fitted_model, product_images):
    model = copy.copy(fitted_model)  # its thresholds are its own: the session's model keeps none
    model.calibrate_threshold(product_images["good"], max_false_positive_rate=0.05)
    expected = expected_flagged_share(model.threshold_source_)
    assert expected.share == pytest.approx(max(0.05, 1 / (len(product_images["good"]) + 1)))


def test_settings_are_checked_and_quantiles_named():
    for bad in (dict(window=0), dict(warn_multiple=0), dict(warn_multiple=float("nan")), dict(min_verdicts=0)):
        with pytest.raises(ValueError):
            DriftSettings(**bad)
    assert [quantile_name(q) for q in (0.5, 0.9, 0.99, 0.999)] == ["p50", "p90", "p99", "p99.9"]
