"""From patch distances to an image score (paper, eq. 7; or the mean of the top patches) and a
full-size anomaly map."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
from scipy.ndimage import gaussian_filter1d

from .geometry import Placement
from .search import MemoryBankIndex


#: The image-score aggregations (setting ``aggregation``) besides ``top<k>`` and ``top<p>%``.
AGGREGATIONS = ("max",)
_TOP = re.compile(r"top(\d+)")
_SHARE = re.compile(r"top(\d+(?:\.\d+)?)%")


def parse_aggregation(aggregation: str) -> tuple[str, float]:
    """``("count", k)`` or ``("share", percent)`` of an ``aggregation`` setting: ``max`` (the
    paper's: the largest patch score, ``("count", 1)``), ``top<k>`` (the mean of the ``k`` largest
    patch scores) or ``top<p>%`` (the mean of the largest ``p`` percent of an image's patch scores,
    at least one)."""
    name = str(aggregation).strip().lower()
    if name == "max":
        return "count", 1
    if (match := _TOP.fullmatch(name)) and int(match.group(1)) >= 1:
        return "count", int(match.group(1))
    if (match := _SHARE.fullmatch(name)) and 0 < float(match.group(1)) <= 100:
        return "share", float(match.group(1))
    raise ValueError(f"aggregation must be max, top<k> (k >= 1: the mean of the k largest patch scores) or top<p>% "
                     f"(the mean of the largest p percent, 0 < p <= 100), got {aggregation!r}")


def top_patches(patch_scores: np.ndarray, aggregation: str) -> np.ndarray:
    """The patches an image score of ``aggregation`` is made of, highest first (ties: the first
    patch first, so ``max``'s patch is ``np.argmax``'s)."""
    kind, value = parse_aggregation(aggregation)
    count = int(value) if kind == "count" else int(math.ceil(patch_scores.size * value / 100.0))
    count = max(1, min(count, patch_scores.size))
    if count == 1:
        return np.array([int(np.argmax(patch_scores))])
    return np.argsort(-patch_scores, kind="stable")[:count]


def eq7_weight(score: float, matched: int, feature: np.ndarray, memory_bank: np.ndarray, neighbours: np.ndarray):
    """Eq. 7's weight of a patch score: ``1 - softmax`` of the patch's distance to its nearest bank
    vector ``m*`` (``matched``) among its distances to ``m*``'s nearest bank vectors ``neighbours``
    (``m*`` among them). Near 0 when the patch is about as close to ``m*``'s neighbours as to ``m*``
    (a dense part of the bank), up to 1 when ``m*`` is isolated."""
    neighbours = np.asarray(neighbours)
    if matched not in neighbours:  # ties between duplicate bank vectors
        neighbours = np.concatenate([[matched], neighbours[:-1]])
    distances = np.linalg.norm(memory_bank[neighbours] - feature, axis=1)
    distances[neighbours == matched] = score  # identical up to rounding; keep it exact
    softmax = np.exp(distances - distances.max())
    return 1.0 - softmax[np.flatnonzero(neighbours == matched)[0]] / softmax.sum()


def reweighted_image_score(
    patch_scores: np.ndarray,
    nearest: np.ndarray,
    patch_features: np.ndarray,
    index: MemoryBankIndex,
    num_neighbours: int = 9,
    neighbours: np.ndarray | None = None,
) -> float:
    """The paper's eq. 7: the largest patch score, scaled down when its nearest bank vector
    ``m*`` lies in a dense part of the bank (the test patch is about as close to ``m*``'s
    ``num_neighbours`` bank neighbours as to ``m*`` itself), up when it is isolated.

    ``patch_scores`` (P,) are distances to the nearest bank vectors ``nearest`` (P,);
    ``patch_features`` (P, D) are the test patches. ``neighbours``: ``m*``'s ``num_neighbours``
    nearest bank vectors when already found (several images' at once), else searched in ``index``.
    """
    worst = int(np.argmax(patch_scores))
    best_score = float(patch_scores[worst])
    if num_neighbours <= 1 or index.size < 2:
        return best_score
    matched = int(nearest[worst])
    if neighbours is None:
        neighbours = index.search(index.memory_bank[matched : matched + 1], num_neighbours)[1][0]
    return eq7_weight(best_score, matched, patch_features[worst], index.memory_bank, neighbours) * best_score


def aggregated_image_score(
    patch_scores: np.ndarray,
    nearest: np.ndarray,
    patch_features: np.ndarray,
    index: MemoryBankIndex,
    aggregation: str = "max",
    reweight: bool = True,
    num_neighbours: int = 9,
    neighbours: np.ndarray | None = None,
) -> float:
    """An image's score from its patch scores (setting ``aggregation``): the mean of its
    :func:`top_patches`, each first re-weighted by eq. 7 with its own nearest bank vector when
    ``reweight`` (``max`` with ``reweight`` is :func:`reweighted_image_score`, to the bit).

    ``neighbours``: each top patch's ``m*``'s ``num_neighbours`` nearest bank vectors, one row per
    top patch, when already found; else searched in ``index``.
    """
    top = top_patches(patch_scores, aggregation)
    if not reweight:
        return float(patch_scores[top[0]]) if len(top) == 1 else float(np.mean(patch_scores[top], dtype=np.float64))
    if num_neighbours <= 1 or index.size < 2:
        return float(patch_scores[top[0]]) if len(top) == 1 else float(np.mean(patch_scores[top], dtype=np.float64))
    if neighbours is None:
        neighbours = index.search(index.memory_bank[np.asarray(nearest)[top]], num_neighbours)[1]
    if len(top) == 1:
        return float(reweighted_image_score(patch_scores, nearest, patch_features, index, num_neighbours, neighbours[0]))
    weighted = [float(eq7_weight(float(patch_scores[p]), int(nearest[p]), patch_features[p], index.memory_bank, row))
                * float(patch_scores[p]) for p, row in zip(top, neighbours)]
    return float(np.mean(weighted))


def _taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``target`` output positions: the two source positions and the second one's weight
    (pixel centres aligned, as ``torch.nn.functional.interpolate(..., align_corners=False)``)."""
    position = (np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5
    position = np.clip(position, 0.0, source - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, source - 1)
    return low, high, (position - low).astype(np.float32)


def resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float array to ``size`` = (height, width), float32."""
    array = np.asarray(array, dtype=np.float32)
    if array.shape == tuple(size):
        return array.copy()
    low, high, weight = _taps(array.shape[0], size[0])
    rows = array[low] * (1.0 - weight)[:, None] + array[high] * weight[:, None]
    low, high, weight = _taps(array.shape[1], size[1])
    return rows[:, low] * (1.0 - weight) + rows[:, high] * weight


def _resize_rows(array: np.ndarray, length: int) -> np.ndarray:
    """Bilinear resize of ``array`` along its first axis to ``length`` rows (as :func:`resize_bilinear`)."""
    if array.shape[0] == length:
        return array
    low, high, weight = _taps(array.shape[0], length)
    weight = weight.astype(array.dtype)[:, None]
    return array[low] * (1.0 - weight) + array[high] * weight


@functools.lru_cache(maxsize=256)
def axis_operator(cells: int, cell: int, content: int, sigma: float, start: int = 0, stop: int | None = None,
                  length: int | None = None) -> np.ndarray:
    """The map's pipeline along one axis as a matrix ``(length, cells)``, float32, read-only.

    A map is made by linear steps, each along one axis at a time: bilinear upsampling of the
    grid to ``cells * cell`` input pixels, the cut to the ``content`` pixels that show the photo,
    Gaussian smoothing (``sigma``, mirrored edges), a bilinear resize onto the photo's pixels
    ``start:stop`` and the edge values extended to ``length`` pixels. So the map of a grid ``S``
    is ``rows @ S @ columns.T`` with one such matrix per axis, made once per geometry (cached):
    two small matrix products instead of passes over every intermediate image. Without
    ``stop``/``length`` the matrix ends at network resolution (:func:`network_map`).
    """
    stop = content if stop is None else stop
    length = stop if length is None else length
    operator = _resize_rows(np.eye(cells), cells * cell)[:content]
    if sigma > 0:
        operator = gaussian_filter1d(operator, sigma, axis=0, mode="reflect")
    operator = _resize_rows(operator, stop - start)
    if (start, stop) != (0, length):
        operator = np.pad(operator, ((start, length - stop), (0, 0)), mode="edge")
    operator = np.ascontiguousarray(operator, dtype=np.float32)
    operator.flags.writeable = False
    return operator


def _check_grid(patch_scores: np.ndarray, placement: Placement) -> np.ndarray:
    if patch_scores.shape != placement.grid_size:
        raise ValueError(f"patch scores of shape {patch_scores.shape} do not match the photo's grid {placement.grid_size}")
    return np.asarray(patch_scores, dtype=np.float32)


def network_map(patch_scores: np.ndarray, placement: Placement, sigma: float = 4.0) -> np.ndarray:
    """Patch-score grid -> smoothed map at network resolution over the part of the input that
    shows the photo, float32 (content height, content width).

    As the paper: bilinear upsampling to the network input, Gaussian smoothing with ``sigma``
    input pixels. ``patch_scores`` covers the cells that show the photo
    (:attr:`Placement.grid_size`); the stride padding is cut off *before* smoothing, so nothing of
    it bleeds into the photo's border (the filter mirrors the photo at its edges instead). The
    map's values are distributed as the full-size map's (which only resizes it), so pixel
    thresholds are calibrated on it at a fraction of the cost. Computed as ``rows @ S @ columns.T``
    (:func:`axis_operator`).
    """
    grid = _check_grid(patch_scores, placement)
    content_height, content_width = placement.content_size
    rows = axis_operator(grid.shape[0], placement.cell, content_height, float(sigma))
    columns = axis_operator(grid.shape[1], placement.cell, content_width, float(sigma))
    return (rows @ grid) @ columns.T


def anomaly_map(patch_scores: np.ndarray, placement: Placement, sigma: float = 4.0) -> np.ndarray:
    """Patch-score grid -> anomaly map over every pixel of the original photo, float32 (height, width).

    The map at network resolution (:func:`network_map`) is resized once, bilinearly, onto the
    region of the photo the input showed. Outside that region (only with a centre crop) the
    border values extend: the network did not see it. All of it, per axis, is one cached matrix
    (:func:`axis_operator`), so a map costs two matrix products (about 1 ms for 900x900).
    """
    grid = _check_grid(patch_scores, placement)
    height, width = placement.image_size
    content_height, content_width = placement.content_size
    # The box in whole original pixels (at most half a pixel off), clipped to the image.
    box_left, box_top, box_right, box_bottom = placement.box
    left, right = max(0, round(box_left)), min(width, max(round(box_right), round(box_left) + 1))
    top, bottom = max(0, round(box_top)), min(height, max(round(box_bottom), round(box_top) + 1))
    rows = axis_operator(grid.shape[0], placement.cell, content_height, float(sigma), top, bottom, height)
    columns = axis_operator(grid.shape[1], placement.cell, content_width, float(sigma), left, right, width)
    return (rows @ grid) @ columns.T
