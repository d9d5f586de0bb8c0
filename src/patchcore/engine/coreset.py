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
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .cpus import free_cpus
from .patch_store import ArrayRows, PatchStore

MIN_RATIO = 0.001
MAX_RATIO = 1.0
#: Up to this many training patches the coreset is the paper's greedy selection over all of them.
EXACT_LIMIT = 250_000
#: Above it, greedy runs per chunk of this many patches, keeping OVERSAMPLING times the chunk's
#: share, then once more over the union of the chunks' picks.
CHUNK_SIZE = 50_000
OVERSAMPLING = 2.0


def coreset_size(n_points: int, ratio: float, max_size: int | None = None) -> int:
    """How many points a coreset of ``ratio`` keeps out of ``n_points`` (at least one, at most ``max_size``)."""
    if not MIN_RATIO <= ratio <= MAX_RATIO:
        raise ValueError(f"coreset ratio must lie between {MIN_RATIO} and {MAX_RATIO}, got {ratio}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"the largest memory bank must hold at least one vector, got {max_size}")
    size = max(1, min(n_points, int(math.ceil(n_points * ratio))))
    return size if max_size is None else min(size, max_size)


def projection_matrix(width: int, projection_dim: int, seed: int) -> np.ndarray | None:
    """The seeded Gaussian projection to ``projection_dim`` dimensions (None: already that narrow)."""
    if width <= projection_dim:
        return None
    matrix = np.random.default_rng(seed).standard_normal((width, projection_dim), dtype=np.float32)
    return matrix / np.float32(math.sqrt(projection_dim))


def random_projection(features: np.ndarray, projection_dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """Project rows of ``features`` with a seeded Gaussian matrix; identity if already narrow."""
    matrix = projection_matrix(features.shape[1], projection_dim, seed)
    if matrix is None:
        return np.ascontiguousarray(features, dtype=np.float32)
    projected = np.empty((features.shape[0], projection_dim), dtype=np.float32)
    for start in range(0, features.shape[0], chunk):  # chunks bound the temporary memory
        np.matmul(np.asarray(features[start : start + chunk], dtype=np.float32), matrix, out=projected[start : start + chunk])
    return projected


def projected(rows: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    """Rows projected and centred (squared distances expanded as |p|^2 - 2 p.c + |c|^2 keep their
    precision when the vectors share a large common offset)."""
    points = np.array(rows if matrix is None else rows @ matrix, dtype=np.float32)
    points -= points.mean(axis=0, dtype=np.float64).astype(np.float32)
    return points


SAMPLERS = ("greedy", "random")


def select_coreset(
    source: PatchStore | ArrayRows | np.ndarray,
    n_select: int,
    sampler: str = "greedy",
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = False,
    exact_limit: int = EXACT_LIMIT,
    chunk_size: int = CHUNK_SIZE,
) -> np.ndarray:
    """Indices of the ``n_select`` rows of ``source`` kept in the memory bank, in the order chosen.

    ``sampler="random"`` draws them uniformly with ``seed`` (the paper's baseline). ``"greedy"`` is
    the paper's k-center coreset on a seeded random projection, the first centre drawn with
    ``seed``. Up to ``exact_limit`` rows it is the greedy selection over all of them. Above it,
    greedy k-center composes (Malkomes et al., NeurIPS 2015): greedy keeps ``OVERSAMPLING`` times
    its share of each contiguous chunk of ``chunk_size`` rows, and greedy over the union of those
    picks chooses the coreset. The work falls from O(rows x picks) to O(rows x chunk picks), which
    is linear in the rows once ``n_select`` is capped, and only a chunk is in memory at a time;
    the coverage radius (the farthest any row lies from the coreset) stays close to the full
    greedy's (``benchmarks/bench_memory.py`` compares them).
    """
    source = ArrayRows(source) if isinstance(source, np.ndarray) else source
    n_points = len(source)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    rng = np.random.default_rng(seed)
    if n_select >= n_points:
        return np.arange(n_points)
    if sampler == "random":
        return rng.choice(n_points, size=n_select, replace=False)
    matrix = projection_matrix(source.width, projection_dim, seed)
    threads = free_cpus()
    if n_points <= exact_limit:
        points = projected(source.read(0, n_points), matrix)
        return farthest_point_order(points, n_select, first=int(rng.integers(n_points)), progress=progress,
                                    threads=threads)
    picks = []
    for start in tqdm(range(0, n_points, chunk_size), desc="coreset chunks", unit="chunk", disable=not progress):
        points = projected(source.read(start, start + chunk_size), matrix)
        share = min(len(points), int(math.ceil(len(points) * n_select / n_points * OVERSAMPLING)))
        picks.append(start + farthest_point_order(points, share, threads=threads))
    union = np.sort(np.concatenate(picks))
    return union[farthest_point_order(projected(source.take(union), matrix), n_select, progress=progress,
                                      threads=threads)]


def greedy_coreset(
    features: np.ndarray,
    ratio: float = 0.1,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = False,
    exact_limit: int = EXACT_LIMIT,
    chunk_size: int = CHUNK_SIZE,
) -> np.ndarray:
    """Indices of the greedy k-center coreset keeping ``ratio`` of the rows of ``features`` (see
    :func:`select_coreset`)."""
    return select_coreset(features, coreset_size(features.shape[0], ratio), "greedy", projection_dim, seed, progress,
                          exact_limit, chunk_size)


def _bounding_sketch(points: np.ndarray, dims: int) -> np.ndarray:
    """Rows ``[PCA coordinates (dims), norm of the PCA residual]`` of the centred points.

    For any two points the squared distance of their sketches is a lower bound of their squared
    distance (a projection cannot lengthen a vector, and the residuals' lengths differ by at most
    the length of their difference), at ``dims + 1`` instead of ``D`` numbers per point.
    """
    centred = points - points.mean(axis=0)
    covariance = centred.T @ centred
    _, vectors = np.linalg.eigh(covariance.astype(np.float64))
    basis = vectors[:, ::-1][:, :dims].astype(np.float32)
    coordinates = centred @ basis
    residual = np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", coordinates, coordinates)
    return np.ascontiguousarray(np.column_stack([coordinates, np.sqrt(np.maximum(residual, 0.0))]), dtype=np.float32)


def farthest_point_order(
    points: np.ndarray, n_select: int, first: int = 0, progress: bool = False, sketch_dims: int = 16,
    initial_nearest: np.ndarray | None = None, threads: int = 1,
) -> np.ndarray:
    """Greedy farthest-point selection of ``n_select`` rows of ``points``, starting at ``first``.

    Exactly the plain greedy result, but each step only measures the points a cheap lower bound
    cannot rule out: the distance of ``sketch_dims``-dimensional sketches (see
    :func:`_bounding_sketch`), and the triangle inequality through each point's current centre.

    ``initial_nearest`` continues a selection: each point's squared distance to centres chosen
    before (not among ``points``); the first pick is then the point farthest from them.

    The thousands of small steps run on ``threads`` BLAS threads: give it only cores that are
    free (:func:`~patchcore.engine.cpus.free_cpus`). Split over two threads beside two busy
    processes, each step waited for a thread kept off the CPU and bottle's coreset took 25x as
    long (x1.55 on one thread); on two idle cores two threads are 1.5x faster than one.
    """
    with threadpool_limits(limits=max(1, threads), user_api="blas"):
        return _farthest_point_order(points, n_select, first, progress, sketch_dims, initial_nearest)


def _farthest_point_order(
    points: np.ndarray, n_select: int, first: int, progress: bool, sketch_dims: int,
    initial_nearest: np.ndarray | None,
) -> np.ndarray:
    n_points, dim = points.shape
    sketch = _bounding_sketch(points, min(sketch_dims, dim))
    sketch_norms = np.einsum("ij,ij->i", sketch, sketch)
    nearest = np.full(n_points, np.inf, dtype=np.float32)  # squared distance to the nearest chosen centre
    # The sketch bound |s_p|^2 - 2 s_p.s_c + |s_c|^2 < nearest_p (with a small slack for rounding)
    # rearranged as s_p.s_c > limit_p + |s_c|^2 / 2: one matrix-vector product and one comparison
    # per step, and `limit` changes only where `nearest` does.
    limit = np.full(n_points, -np.inf, dtype=np.float32)
    # Index (into `chosen`) of each point's centre; -1 for a centre chosen before this call.
    owner = np.zeros(n_points, dtype=np.int32)
    if initial_nearest is not None:
        nearest[:] = initial_nearest
        limit[:] = 0.5 * (sketch_norms - 1.0001 * nearest)
        owner[:] = -1
        first = int(np.argmax(nearest))
    centres = np.empty((n_select, dim), dtype=np.float32)
    centre_norms = np.empty(n_select, dtype=np.float32)
    chosen = np.empty(n_select, dtype=np.int64)
    norms = np.einsum("ij,ij->i", points, points)
    # Gathering scattered rows costs several times more per row than streaming through all of
    # them, so above this many candidates a step measures every point.
    gather_limit = n_points // 8
    candidate = first
    bar = tqdm(total=n_select, desc="coreset", unit="pt", disable=not progress, mininterval=0.5)
    for step in range(n_select):
        chosen[step] = candidate
        centre = points[candidate]
        centres[step] = centre
        centre_norms[step] = norms[candidate]
        if step == 0 and initial_nearest is None:
            affected = np.arange(n_points)
        else:
            affected = np.flatnonzero(sketch @ sketch[candidate] > limit + 0.5 * sketch_norms[candidate])
            if len(affected) > 64 and step > 0:
                # Triangle inequality: only points whose centre lies within 2 r of the new one
                # (points still owned by a centre from before cannot be ruled out this way).
                gaps = centre_norms[:step] - 2.0 * (centres[:step] @ centre) + centre_norms[step]
                owners = owner[affected]
                affected = affected[(owners < 0) | (gaps[np.maximum(owners, 0)] < 4.0001 * nearest[affected])]
        if len(affected) > gather_limit:  # one streaming pass over all points is cheaper
            squared = norms - 2.0 * (points @ centre) + centre_norms[step]
            closer = np.flatnonzero(squared < nearest)
            nearest[closer] = squared[closer]
        else:
            differences = points[affected] - centre
            squared = np.einsum("ij,ij->i", differences, differences)
            moved = squared < nearest[affected]
            closer = affected[moved]
            nearest[closer] = squared[moved]
        owner[closer] = step
        limit[closer] = 0.5 * (sketch_norms[closer] - 1.0001 * nearest[closer])
        candidate = int(np.argmax(nearest))
        bar.update()
    bar.close()
    return chosen


def continue_greedy(bank: np.ndarray, candidates: np.ndarray, n_select: int, projection_dim: int = 128, seed: int = 0) -> np.ndarray:
    """Indices of ``n_select`` rows of ``candidates`` that greedy k-center would add to ``bank``
    next, on the same seeded projection as the fit: each step the candidate farthest from the bank
    and from those already added (fewer when every candidate is already in the bank)."""
    from .search import MemoryBankIndex

    matrix = projection_matrix(bank.shape[1], projection_dim, seed)
    project = (lambda rows: rows) if matrix is None else (lambda rows: rows @ matrix)
    old, new = np.asarray(project(bank), np.float32), np.asarray(project(candidates), np.float32)
    centre = old.mean(axis=0, dtype=np.float64).astype(np.float32)
    old, new = old - centre, new - centre
    distances, _ = MemoryBankIndex(old).search(new, 1)
    # A candidate within rounding of a bank vector (the search's expanded form leaves ~1e-3 of the
    # vectors' scale) is already in the bank.
    scale = float(np.sqrt(np.mean(np.einsum("ij,ij->i", old, old))))
    nearest = np.where(distances[:, 0] > 1e-3 * scale, distances[:, 0], 0.0).astype(np.float32) ** 2
    n_select = min(n_select, int(np.count_nonzero(nearest > 0)))
    if n_select <= 0:
        return np.empty(0, dtype=np.int64)
    return farthest_point_order(new, n_select, initial_nearest=nearest)


def coverage_radius(features: np.ndarray, kept: np.ndarray, chunk: int = 4096) -> float:
    """Largest distance from any row of ``features`` to its nearest row among ``kept`` indices."""
    from .search import MemoryBankIndex

    index = MemoryBankIndex(features[kept])
    worst = 0.0
    for start in range(0, features.shape[0], chunk):
        distances, _ = index.search(features[start : start + chunk], 1)
        worst = max(worst, float(distances.max()))
    return worst
