"""Thresholds from the training photos themselves: each photo of a seeded sample is scored against
the memory bank without the vectors that came from it, and the thresholds are set from those
scores at the false-positive rates asked for, as held-out good photos would set them.

Why: a verdict needs a threshold, a threshold needs scores of good photos the model has not
learned from, and most users have no second folder of good photos. The bank records where each
of its vectors came from (``memory_bank_origin_``), so searching it with a photo's own vectors
left out approximates the model fitted without that photo (leave one out). It is an
approximation: refitted without the photo, the coreset would have chosen other vectors in place
of the ones left out; and a photo whose near copy was also trained on (a fixed camera) scores
low either way. docs/experiments.md measures how far the estimate lands from a true held-out
calibration ("Self-calibration").

Scores are measured as :meth:`~patchcore.engine.detector.Detector.predict` measures them: exact
search where the model searches exactly; with an approximate index, its neighbours for every
patch and the highest patches re-measured exactly (the image score is then exact search's), in
both cases in the bank without the photo's own vectors. Eq. 7's neighbours of the matched bank
vector come from that bank too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy.special import betaincinv

from .geometry import Placement
from .scoring import aggregated_image_score, network_map, top_patches
from .search import MemoryBankIndex
from .thresholds import flagging_threshold, kept_for, top_values

#: Candidates asked of an approximate index per patch: the nearest that did not come from the
#: photo itself is its score (patches whose candidates all came from it are searched exactly).
#: On bottle, 8 left no patch without another photo's candidate (1 left 5%), at the cost of 1.
APPROXIMATE_CANDIDATES = 8
#: Highest patches re-measured exactly in the first round with an approximate index (twice as
#: many each further round), as :data:`~patchcore.engine.detector.EXACT_RECHECK`.
EXACT_RECHECK = 8
#: Confidence of the interval printed for the false-positive rate a threshold will give.
CONFIDENCE = 0.95
#: Pixel-score quantiles recorded of the estimated distribution, over :data:`PIXEL_SAMPLE` evenly
#: spaced pixels of each photo's map (the thresholds use every pixel).
PIXEL_QUANTILES = (0.5, 0.9, 0.99, 0.999)
PIXEL_SAMPLE = 1000
#: What ``calibration`` may be: ``self`` (leave-one-photo-out at fit) or ``none``.
CALIBRATIONS = ("self", "none")


def photo_groups(training_images: Sequence[dict]) -> list[list[int]]:
    """The training images of each photo, in the order of the photos: the photo and every copy
    made of it by ``augment`` (copies carry the photo's name and a ``view``). Leaving a photo out
    means leaving all of them out."""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(training_images):
        groups.setdefault(record["name"], []).append(index)
    return [group for group in groups.values() if any("view" not in training_images[i] for i in group)]


def chosen_photos(count: int, sample: int | None, seed: int) -> np.ndarray:
    """Positions of the photos scored: every one, or a seeded sample of ``sample`` (sorted)."""
    if sample is None or sample >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, sample, replace=False))


def left_out_rows(origins: np.ndarray, groups: list[list[int]], photo: int, neighbours: int = 0) -> np.ndarray:
    """Bank rows that came from photo ``photo`` (any copy of it), and from the ``neighbours``
    photos either side of it in training order when asked (near copies from a fixed camera)."""
    images = [i for g in groups[max(0, photo - neighbours) : photo + neighbours + 1] for i in g]
    return np.flatnonzero(np.isin(origins[:, 0], images))


def false_positive_interval(count: int, rate: float, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """The false-positive rate that a threshold set from ``count`` good scores at ``rate``
    (:func:`~patchcore.engine.thresholds.flagging_threshold`) gives on further good photos:
    its expected value and a central ``confidence`` interval.

    The threshold sits just above the (k+1)-th highest score, k = floor(rate * count); the share
    of good photos above the (k+1)-th highest of ``count`` independent ones follows
    Beta(k + 1, count - k) whatever their distribution (the coverage of an order statistic; the
    same family as the Clopper-Pearson interval). It assumes the scores are like those of new
    photos: leave-one-out scores may sit lower (see the module's note).
    """
    allowed = kept_for(count, rate) - 1  # scores the threshold leaves above it
    a, b = allowed + 1, count - allowed
    tail = (1.0 - confidence) / 2.0
    return a / (count + 1), float(betaincinv(a, b, tail)), float(betaincinv(a, b, 1.0 - tail))


@dataclass
class LeftOutScores:
    """One photo's scores with its own bank vectors left out: the image score, and of its anomaly
    map at network resolution (what pixel thresholds are set on) the number of pixels, the
    highest values (as many as a threshold over all the photos can need: sorting millions of
    pixels cost more than the scoring) and :data:`PIXEL_SAMPLE` evenly spaced values."""

    score: float
    pixel_count: int
    top_pixels: np.ndarray
    pixel_sample: np.ndarray

    @classmethod
    def of(cls, score: float, pixels: np.ndarray, keep: int | None = None) -> "LeftOutScores":
        """From a photo's map values ``pixels``, keeping the ``keep`` highest (``None``: all)."""
        pixels = np.asarray(pixels, dtype=np.float32).ravel()
        step = max(1, pixels.size // PIXEL_SAMPLE)
        top = pixels if keep is None else top_values(pixels, keep)
        return cls(float(score), pixels.size, np.array(top), pixels[::step].copy())


def left_out_patch_scores(index, exact: MemoryBankIndex, patches: np.ndarray,
                          excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each patch's distance to its nearest bank vector outside ``excluded``, and that vector.

    Exact search when ``index`` is exact; else the approximate index's nearest candidate outside
    ``excluded`` (all excluded: exact search), then the highest patches re-measured exactly
    until the best exact score reaches the next approximate one, as predict does."""
    if isinstance(index, MemoryBankIndex):
        distances, nearest = exact.search_excluding(patches, excluded, 1)
        return distances[:, 0], nearest[:, 0]
    left_out = np.zeros(exact.size, bool)
    left_out[excluded] = True
    candidates, squared = index.neighbours(patches, APPROXIMATE_CANDIDATES)
    squared = np.where(left_out[candidates], np.inf, squared)
    nearest = candidates[np.arange(len(patches)), squared.argmin(axis=1)].astype(np.int64)
    missing = left_out[nearest]
    if missing.any():
        nearest[missing] = exact.search_excluding(patches[missing], excluded, 1)[1][:, 0]
    distances = exact.distances(patches, nearest[:, None])[:, 0]
    order = np.argsort(-distances, kind="stable")
    start, size, best = 0, EXACT_RECHECK, -np.inf
    while start < len(order) and distances[order[start]] > best:
        chunk = order[start : start + size]
        found, rows = exact.search_excluding(patches[chunk], excluded, 1)
        distances[chunk], nearest[chunk] = found[:, 0], rows[:, 0]
        best = max(best, float(found.max()))
        start, size = start + size, 2 * size
    return distances, nearest


def left_out_scores(index, exact: MemoryBankIndex, grid: np.ndarray, placement: Placement, excluded: np.ndarray,
                    aggregation: str, reweight: bool, num_neighbours: int, sigma: float,
                    keep: int | None = None) -> LeftOutScores:
    """A photo's image score and map values (:class:`LeftOutScores`, the ``keep`` highest pixels)
    with the bank rows ``excluded`` left out, its patch features ``grid`` ``(rows, columns, width)``."""
    patches = grid.reshape(-1, grid.shape[-1])
    distances, nearest = left_out_patch_scores(index, exact, patches, excluded)
    neighbours = None
    if reweight and num_neighbours > 1 and exact.size - len(excluded) >= 2:
        top = top_patches(distances, aggregation)
        neighbours = exact.search_excluding(exact.memory_bank[nearest[top]], excluded, num_neighbours)[1]
    score = aggregated_image_score(distances, nearest, patches, exact, aggregation, reweight,
                                   num_neighbours if neighbours is not None else 1, neighbours)
    return LeftOutScores.of(score, network_map(distances.reshape(grid.shape[:2]), placement, sigma), keep)


def thresholds_from(found: list[LeftOutScores], rate: float, pixel_rate: float) -> tuple[float, float]:
    """The image and pixel thresholds that flag at most ``rate`` of the scores and ``pixel_rate``
    of the pixels of ``found``."""
    pixels = np.concatenate([item.top_pixels for item in found])
    total = sum(item.pixel_count for item in found)
    return flagging_threshold([item.score for item in found], rate), flagging_threshold(pixels, pixel_rate, total)


def calibration_record(method: str, names: list[str], found: list[LeftOutScores], rate: float, pixel_rate: float,
                       neighbours: int = 0, seconds: float | None = None) -> dict:
    """What a model keeps of how its thresholds were set: the method (``self``: left out of the
    bank in turn; ``held-out``: other good photos), the photos, the rates asked for, the
    estimated distribution of good scores (every image score, pixel quantiles) and the
    false-positive rate expected of the image threshold with its interval."""
    scores = [item.score for item in found]
    expected, low, high = false_positive_interval(len(scores), rate)
    pixels = np.concatenate([item.pixel_sample for item in found])
    record = {
        "method": method, "photos": len(scores), "names": list(names), "max_fpr": rate, "max_pixel_fpr": pixel_rate,
        "scores": [round(s, 6) for s in scores],
        "pixel_quantiles": {str(q): float(np.quantile(pixels, q)) for q in PIXEL_QUANTILES},
        "expected_fpr": expected, "fpr_interval": [low, high], "confidence": CONFIDENCE,
    }
    if method == "self":
        record["left_out"] = "the photo's own bank vectors and its copies'" + (
            f", and those of the {neighbours} photos either side of it in training order" if neighbours else "")
    if seconds is not None:
        record["seconds"] = round(seconds, 3)
    return record


def threshold_kind(threshold: float | None, calibration: dict | None, source: str | None) -> str:
    """Which kind of threshold a model has, in words: ``none``, ``self-calibrated from N training
    photos``, ``calibrated on N held-out good photos`` or how it was set otherwise."""
    if threshold is None:
        return "none"
    if calibration and calibration.get("method") == "self":
        return f"self-calibrated from {calibration['photos']} training photos"
    if calibration and calibration.get("method") == "held-out":
        return f"calibrated on {calibration['photos']} held-out good photos"
    if source and source.split(" ", 2)[1:2] == ["good"] and source.split(" ", 1)[0].isdigit():
        return f"calibrated on {source.split(' ', 1)[0]} held-out good photos"  # models saved before the record
    return f"set by hand ({source})" if source else "set by hand"


def describe_estimate(record: dict) -> str:
    """One line for people: the expected false-positive rate of a calibration and its interval."""
    low, high = record["fpr_interval"]
    return (f"expected false-positive rate {100 * record['expected_fpr']:.1f}% ({100 * record['confidence']:.0f}% "
            f"interval {100 * low:.2f}-{100 * high:.1f}%, order statistic of {record['photos']} good scores: "
            f"Beta(k+1, n-k))")


def score_left_out(photos: Iterable[tuple[int, np.ndarray, Placement]], groups: list[list[int]], origins: np.ndarray,
                   scorer: Callable[[np.ndarray, Placement, np.ndarray], LeftOutScores],
                   neighbours: int = 0) -> list[LeftOutScores]:
    """:class:`LeftOutScores` of each ``(photo position, grid, placement)`` in ``photos``, the
    photo's bank rows (:func:`left_out_rows`) left out."""
    return [scorer(grid, placement, left_out_rows(origins, groups, photo, neighbours)) for photo, grid, placement in photos]
