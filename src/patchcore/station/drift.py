"""Drift: does a model still flag what its calibration said it would?

A threshold calibrated on good images (``fit --calibrate``, ``add --recalibrate``) flags at most a
chosen share of them (``--max-fpr``); the model says which in ``threshold_source_``. On a line
whose photos keep looking like those images, the share of recent verdicts flagged stays near that
rate (real defects add a little). When the light, the camera or the product changes, scores creep
up and the flagged share climbs far above it: the line stops for false alarms before anyone knows
why. :func:`drift_of` measures the last N scores against what calibration expected and says so
plainly when the flagged share exceeds a set multiple of the calibrated rate.

Pure computation on a sequence of scores (the service reads them from the history database).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

#: Score quantiles reported over the window.
QUANTILES = (0.5, 0.9, 0.99)
#: Verdicts a window needs before it may warn (or the whole window, if smaller): a handful of
#: photos with one flagged says nothing about a rate of 1%.
MIN_VERDICTS = 50

_CALIBRATED = re.compile(r"(?:(\d+) (?:good images|training photos)[^:]*: )?image false-positive rate <= ([0-9.eE+-]+)")


@dataclass(frozen=True)
class DriftSettings:
    """How drift is watched: over the last ``window`` scored verdicts of a model, warning when the
    flagged share exceeds ``warn_multiple`` times the calibrated false-positive rate, once the
    window holds at least ``min(window, min_verdicts)`` verdicts."""

    window: int = 500
    warn_multiple: float = 3.0
    min_verdicts: int = MIN_VERDICTS

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"the drift window must hold at least 1 verdict, got {self.window}")
        if not self.warn_multiple > 0 or not np.isfinite(self.warn_multiple):
            raise ValueError(f"the drift warning multiple must be a positive number, got {self.warn_multiple}")
        if self.min_verdicts < 1:
            raise ValueError(f"min_verdicts must be at least 1, got {self.min_verdicts}")


@dataclass(frozen=True)
class Expected:
    """What calibration promised: the share of good photos flagged, at most (``None``: the
    threshold was not calibrated at a false-positive rate, e.g. set by hand), and why."""

    share: float | None
    basis: str


def expected_flagged_share(threshold_source: str | None) -> Expected:
    """The flagged share a threshold was calibrated for, read from the model's ``threshold_source_``
    (``"200 good images: image false-positive rate <= 0.01, ..."``). Calibrated on n good images,
    a threshold cannot promise a rate below 1/(n+1) (at rate 0 it is the highest good score, and
    the next good photo is the highest of n+1 as often as not), so that is the floor."""
    if not threshold_source:
        return Expected(None, "no threshold")
    match = _CALIBRATED.search(threshold_source)
    if match is None:
        return Expected(None, f"threshold not calibrated at a false-positive rate ({threshold_source})")
    try:
        rate = float(match.group(2).rstrip(",."))
    except ValueError:
        return Expected(None, f"threshold source not understood ({threshold_source})")
    images = int(match.group(1)) if match.group(1) else None
    floor = 1.0 / (images + 1) if images else 0.0
    basis = f"calibrated at false-positive rate {rate:g}" + (f" on {images} good images" if images else "")
    if floor > rate:
        basis += f"; {images} images cannot promise less than {floor:.3g}"
    return Expected(max(rate, floor), basis)


@dataclass(frozen=True)
class Drift:
    """A model's recent verdicts against its calibration."""

    #: Scored verdicts in the window (at most the window's size).
    verdicts: int
    #: The model's current threshold (``None``: it has none, and nothing is flagged).
    threshold: float | None
    #: Of the window, how many scores are at or above the threshold, and their share.
    flagged: int | None
    flagged_share: float | None
    #: The share calibration expected (see :func:`expected_flagged_share`).
    expected_share: float | None
    expected_basis: str
    #: ``{quantile: score}`` over the window (empty without verdicts).
    quantiles: dict[float, float] = field(default_factory=dict)
    #: flagged share / expected share (``None`` when either is unknown or expected is 0).
    ratio: float | None = None
    #: A sentence for people when the flagged share exceeds the set multiple; else ``None``.
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (quantiles keyed ``"p50"``, ``"p90"``, ...)."""
        return {
            "verdicts": self.verdicts, "threshold": self.threshold, "flagged": self.flagged,
            "flagged_share": self.flagged_share, "expected_share": self.expected_share,
            "expected_basis": self.expected_basis, "ratio": self.ratio, "warning": self.warning,
            "quantiles": {quantile_name(q): value for q, value in self.quantiles.items()},
        }


def quantile_name(quantile: float) -> str:
    """``0.5`` -> ``"p50"``, ``0.99`` -> ``"p99"``, ``0.999`` -> ``"p99.9"``."""
    return "p" + f"{100 * quantile:.4g}"


def drift_of(scores: Sequence[float] | np.ndarray, threshold: float | None, expected: Expected,
             settings: DriftSettings = DriftSettings()) -> Drift:
    """The drift figures of the last ``settings.window`` of ``scores`` (oldest first) against
    ``threshold`` and what calibration ``expected``. A score flags at or above the threshold, as
    the model decides."""
    window = np.asarray(scores, dtype=np.float64)[-settings.window:]
    window = window[np.isfinite(window)]
    count = int(window.size)
    quantiles = {q: float(v) for q, v in zip(QUANTILES, np.quantile(window, QUANTILES))} if count else {}
    if threshold is None:
        return Drift(count, None, None, None, expected.share, expected.basis, quantiles)
    flagged = int(np.count_nonzero(window >= threshold))
    share = flagged / count if count else None
    ratio = share / expected.share if share is not None and expected.share else None
    warning = None
    enough = count >= min(settings.window, settings.min_verdicts)
    if enough and share is not None and expected.share is not None and share > settings.warn_multiple * expected.share:
        warning = (f"{flagged} of the last {count} photos were flagged ({100 * share:.1f}%), more than "
                   f"{settings.warn_multiple:g} times the {100 * expected.share:.2g}% calibration expected: the photos "
                   "no longer look like the good images the threshold was set on (light, camera, product?). Review the "
                   "flagged photos: teach false alarms in, or recalibrate.")
    return Drift(count, float(threshold), flagged, share, expected.share, expected.basis, quantiles, ratio, warning)
