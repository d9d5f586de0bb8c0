"""Decision thresholds: set from good images only, and the one rule that applies them.

An image is anomalous when its score reaches the image threshold; a pixel is part of the defect
mask when its anomaly-map value reaches the pixel threshold. The two live on different scales
(eq. 7 image scores versus smoothed patch distances), so each is calibrated on its own.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def threshold_at_fpr(good_scores: Sequence[float] | np.ndarray, fpr: float) -> float:
    """A threshold set from good images only, for the decision rule ``score > threshold``.

    Rule: with n good scores sorted from highest, let k = floor(fpr * n) be the number of false
    alarms allowed (at most n - 1); the threshold is the (k+1)-th highest score. Then at most k
    good scores, a share of at most ``fpr``, lie strictly above it. ``fpr=0`` gives the highest
    good score. With small samples the rule stays on the safe side: when n < 1 / fpr, no false
    alarm is allowed and the threshold is the highest score. Ties can only lower the share.
    """
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("no good scores given")
    if not np.isfinite(scores).all():
        raise ValueError("good scores contain NaN or infinite values")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    allowed = min(int(np.floor(fpr * scores.size + 1e-9)), scores.size - 1)
    return float(np.partition(scores, scores.size - 1 - allowed)[scores.size - 1 - allowed])


def flagging_threshold(good_scores: Sequence[float] | np.ndarray, fpr: float) -> float:
    """The smallest float32 threshold that flags (``score >= threshold``) at most ``fpr`` of ``good_scores``."""
    highest_allowed = threshold_at_fpr(good_scores, fpr)
    # threshold_at_fpr leaves scores strictly above it flagged; ours flags scores at or above.
    return float(np.nextafter(np.float32(highest_allowed), np.float32(np.inf)))


def is_anomalous(score: float, threshold: float | None) -> bool | None:
    """The image decision: ``score >= threshold``, or ``None`` without a threshold."""
    return None if threshold is None else bool(score >= threshold)


def defect_mask(anomaly_map: np.ndarray | None, pixel_threshold: float | None) -> np.ndarray | None:
    """Pixels whose anomaly score reaches ``pixel_threshold`` (``None`` without a map or threshold)."""
    if anomaly_map is None or pixel_threshold is None:
        return None
    return anomaly_map >= pixel_threshold
