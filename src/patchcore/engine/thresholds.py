"""Decision thresholds: set from good images only, and the one rule that applies them.

An image is anomalous when its score reaches the image threshold; a pixel is part of the defect
mask when its anomaly-map value reaches the pixel threshold. The two live on different scales
(eq. 7 image scores versus smoothed patch distances), so each is calibrated on its own.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def threshold_at_fpr(good_scores: Sequence[float] | np.ndarray, fpr: float, total: int | None = None) -> float:
    """A threshold set from good images only, for the decision rule ``score > threshold``.

    Rule: with n good scores sorted from highest, let k = floor(fpr * n) be the number of false
    alarms allowed (at most n - 1); the threshold is the (k+1)-th highest score. Then at most k
    good scores, a share of at most ``fpr``, lie strictly above it. ``fpr=0`` gives the highest
    good score. With small samples the rule stays on the safe side: when n < 1 / fpr, no false
    alarm is allowed and the threshold is the highest score. Ties can only lower the share.

    ``total``: the scores given are the highest ``len(good_scores)`` of ``total`` good scores
    (enough of them: more than ``fpr * total``), so that a threshold over millions of pixels
    needs only their top (:func:`top_values`).
    """
    scores = np.asarray(good_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("no good scores given")
    if not np.isfinite(scores).all():
        raise ValueError("good scores contain NaN or infinite values")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    total = scores.size if total is None else total
    allowed = kept_for(total, fpr) - 1  # false alarms allowed
    if allowed >= scores.size:
        raise ValueError(f"{scores.size} highest of {total} scores cannot set a threshold at fpr {fpr}: "
                         f"{allowed + 1} are needed")
    return float(np.partition(scores, scores.size - 1 - allowed)[scores.size - 1 - allowed])


def kept_for(total: int, fpr: float) -> int:
    """How many of the highest of ``total`` scores :func:`threshold_at_fpr` needs at ``fpr``."""
    return min(int(np.floor(fpr * total + 1e-9)), total - 1) + 1


def top_values(values: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` highest of ``values`` (all of them when fewer), in no particular order."""
    values = np.asarray(values).ravel()
    return values if count >= values.size else np.partition(values, values.size - count)[values.size - count :]


def flagging_threshold(good_scores: Sequence[float] | np.ndarray, fpr: float, total: int | None = None) -> float:
    """The smallest float32 threshold that flags (``score >= threshold``) at most ``fpr`` of
    ``good_scores`` (the highest of ``total`` good scores, when given: :func:`threshold_at_fpr`)."""
    highest_allowed = threshold_at_fpr(good_scores, fpr, total)
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
