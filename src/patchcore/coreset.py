"""Greedy k-center coreset selection (paper, section 3.2 and algorithm 1).

Points are chosen one at a time, each the training vector farthest from all chosen so far,
measured on a seeded random projection to ``projection_dim`` dimensions (Johnson-Lindenstrauss)
to keep the pass cheap.

The result is exactly the plain greedy algorithm's, computed faster: each point remembers its
nearest chosen centre and its distance ``r`` to it; a new centre ``c`` can only come closer to a
point whose centre lies within ``2 r`` of ``c`` (triangle inequality), so all other points are
skipped. Once the first few hundred centres are chosen, a new one touches only a small share of
the points. Memory stays O(N): the projected points plus a few numbers per point.
"""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

MIN_RATIO = 0.001
MAX_RATIO = 1.0


def coreset_size(n_points: int, ratio: float) -> int:
    """How many points a coreset of ``ratio`` keeps out of ``n_points`` (at least one)."""
    if not MIN_RATIO <= ratio <= MAX_RATIO:
        raise ValueError(f"coreset ratio must lie between {MIN_RATIO} and {MAX_RATIO}, got {ratio}")
    return max(1, min(n_points, int(math.ceil(n_points * ratio))))


def random_projection(features: np.ndarray, projection_dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """Project rows of ``features`` with a seeded Gaussian matrix; identity if already narrow."""
    if features.shape[1] <= projection_dim:
        return np.ascontiguousarray(features, dtype=np.float32)
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((features.shape[1], projection_dim), dtype=np.float32)
    matrix /= np.float32(math.sqrt(projection_dim))
    projected = np.empty((features.shape[0], projection_dim), dtype=np.float32)
    for start in range(0, features.shape[0], chunk):  # chunks bound the temporary memory
        np.matmul(features[start : start + chunk], matrix, out=projected[start : start + chunk])
    return projected


def greedy_coreset(
    features: np.ndarray,
    ratio: float = 0.1,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Indices of the greedy k-center coreset of ``features`` (rows), in the order chosen.

    ``ratio`` is the kept fraction (0.001 to 1). The first centre is drawn with ``seed``.
    """
    n_points = features.shape[0]
    n_select = coreset_size(n_points, ratio)
    if n_select >= n_points:
        return np.arange(n_points)
    points = random_projection(features, projection_dim, seed)
    return farthest_point_order(points, n_select, first=int(np.random.default_rng(seed).integers(n_points)), progress=progress)


def farthest_point_order(points: np.ndarray, n_select: int, first: int = 0, progress: bool = False) -> np.ndarray:
    """Greedy farthest-point selection of ``n_select`` rows of ``points``, starting at ``first``."""
    n_points, dim = points.shape
    radius = np.full(n_points, np.inf, dtype=np.float32)  # distance to the nearest chosen centre
    owner = np.zeros(n_points, dtype=np.int32)  # index (into `chosen`) of that centre
    centres = np.empty((n_select, dim), dtype=np.float32)
    centre_norms = np.empty(n_select, dtype=np.float32)
    chosen = np.empty(n_select, dtype=np.int64)
    candidate = first
    bar = tqdm(total=n_select, desc="coreset", unit="pt", disable=not progress, mininterval=0.5)
    for step in range(n_select):
        chosen[step] = candidate
        centre = points[candidate]
        centres[step] = centre
        centre_norms[step] = centre @ centre
        if step == 0:
            affected = np.arange(n_points)
        else:
            # Squared distances from the new centre to every earlier one, then the prune test
            # |c_owner - c| < 2 r  <=>  |c_owner - c|^2 < 4 r^2.
            gaps = centre_norms[:step] - 2.0 * (centres[:step] @ centre) + centre_norms[step]
            affected = np.flatnonzero(gaps[owner] < 4.0 * radius * radius)
        differences = points[affected] - centre
        distances = np.sqrt(np.einsum("ij,ij->i", differences, differences))
        closer = distances < radius[affected]
        updated = affected[closer]
        radius[updated] = distances[closer]
        owner[updated] = step
        candidate = int(np.argmax(radius))
        bar.update()
    bar.close()
    return chosen


def coverage_radius(features: np.ndarray, kept: np.ndarray, chunk: int = 4096) -> float:
    """Largest distance from any row of ``features`` to its nearest row among ``kept`` indices."""
    import faiss

    index = faiss.IndexFlatL2(features.shape[1])
    index.add(np.ascontiguousarray(features[kept], dtype=np.float32))
    worst = 0.0
    for start in range(0, features.shape[0], chunk):
        squared, _ = index.search(np.ascontiguousarray(features[start : start + chunk], dtype=np.float32), 1)
        worst = max(worst, float(squared.max()))
    return math.sqrt(max(worst, 0.0))
