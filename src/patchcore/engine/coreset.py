"""Greedy k-center coreset selection (paper, section 3.2 and algorithm 1).

Points are chosen one at a time, each the training vector farthest from all chosen so far,
measured on a seeded random projection to ``projection_dim`` dimensions (Johnson-Lindenstrauss)
to keep the pass cheap.

The result is exactly the plain greedy loop's (each pick the point with the largest float32 squared
distance to its nearest earlier pick, the first such point on ties), computed faster: picks that
the loop would make one after the other without one moving the next are taken as one batch, and a
batch's update measures exactly only the points that a cheap lower bound of their distance (a
17-number sketch per point) cannot rule out (:func:`_farthest_point_order`). Memory stays O(N):
the projected points plus a few numbers per point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Chunking:
    """When and how the greedy coreset runs in chunks (a chunked fit, on one machine or on Ray).

    Above ``exact_limit`` training patches a fit runs greedy per chunk of about ``chunk_size``
    patches (whole photos: :mod:`.chunks`), keeping ``oversampling`` times the chunk's share,
    then once more over the union of the chunks' picks. A fit on Ray always chunks.
    """

    exact_limit: int = EXACT_LIMIT
    chunk_size: int = CHUNK_SIZE
    oversampling: float = OVERSAMPLING

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.oversampling < 1:
            raise ValueError(f"oversampling must be at least 1, got {self.oversampling}")


def chunk_share(rows: int, photos: int, total_photos: int, ratio: float, max_size: int | None,
                oversampling: float = OVERSAMPLING) -> int:
    """How many of a chunk's ``rows`` patches (from ``photos`` of ``total_photos`` photos) greedy keeps
    for the union: ``oversampling`` times its share of the bank, the ratio of its patches or, when the
    bank's cap binds, its photos' share of the cap. Known from the chunk alone, so that chunks can be
    reduced before the total number of patches is known (on Ray, as they finish)."""
    share = rows * ratio
    if max_size is not None:
        share = min(share, max_size * photos / total_photos)
    return max(1, min(rows, int(math.ceil(share * oversampling))))


def chunk_picks(rows: np.ndarray, share: int, matrix: np.ndarray | None, threads: int = 1) -> np.ndarray:
    """Indices (ascending) of the ``share`` rows of one chunk that greedy keeps for the union."""
    return np.sort(farthest_point_order(projected(rows, matrix), share, threads=threads))


def merge_picks(union: np.ndarray, n_select: int, matrix: np.ndarray | None, progress: bool = False,
                threads: int = 1) -> np.ndarray:
    """Indices of the ``n_select`` rows of the chunks' union (in chunk order) kept, in the order chosen."""
    return farthest_point_order(projected(union, matrix), min(n_select, len(union)), progress=progress, threads=threads)


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
    points = np.array(rows, dtype=np.float32) if matrix is None else np.asarray(rows @ matrix, dtype=np.float32)
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
    picks, picked_rows = [], []
    for start in tqdm(range(0, n_points, chunk_size), desc="coreset chunks", unit="chunk", disable=not progress):
        rows = source.read(start, start + chunk_size)
        # Each row its own "photo": the chunk's share of the bank is its share of the rows.
        local = chunk_picks(rows, chunk_share(len(rows), len(rows), n_points, n_select / n_points, None), matrix, threads)
        picks.append(start + local)
        picked_rows.append(rows[local])  # the union's rows, without reading the source again
    union = np.concatenate(picks)  # sorted: chunks are consecutive
    return union[merge_picks(np.concatenate(picked_rows), n_select, matrix, progress, threads)]


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


#: Relative slack of the sketch test: rounding never rules out a point that a new centre brings closer.
SLACK = np.float32(1.0001)
#: Rows gathered at a time when measuring exact distances (bounds the temporary memory: 4 MB at 128 dims).
PAIR_CHUNK = 8192
#: Memory of the sketch products of one batch of centres: with the point count, it sets the largest batch.
BATCH_BYTES = 8 << 20


def _bounding_sketch(points: np.ndarray, dims: int, sample: int = 8192, chunk: int = 8192) -> np.ndarray:
    """Rows ``[PCA coordinates (dims), norm of the PCA residual]`` of the points.

    For any two points the squared distance of their sketches is a lower bound of their squared
    distance (a projection cannot lengthen a vector, and the residuals' lengths differ by at most
    the length of their difference), at ``dims + 1`` instead of ``D`` numbers per point. Any
    orthonormal basis keeps the bound, so the principal axes come from an evenly spaced sample of
    ``sample`` rows; the residual is measured directly (not as a difference of squared norms,
    which loses the bound to rounding when the residual is short).
    """
    width = points.shape[1]
    rows = np.array(points[:: max(1, len(points) // sample)], dtype=np.float32)
    mean = rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    rows -= mean
    _, vectors = np.linalg.eigh((rows.T @ rows).astype(np.float64))
    basis = np.ascontiguousarray(vectors[:, ::-1][:, :dims], dtype=np.float32)
    back = np.ascontiguousarray(basis.T)
    sketch = np.empty((len(points), dims + 1), dtype=np.float32)
    # Preallocated work rows: fresh multi-megabyte temporaries cost page faults on every chunk.
    centred = np.empty((min(chunk, len(points)), width), dtype=np.float32)
    restored = np.empty_like(centred)
    coordinates = np.empty((len(centred), dims), dtype=np.float32)
    for start in range(0, len(points), chunk):
        size = min(chunk, len(points) - start)
        np.subtract(points[start : start + size], mean, out=centred[:size])
        np.matmul(centred[:size], basis, out=coordinates[:size])
        np.matmul(coordinates[:size], back, out=restored[:size])
        centred[:size] -= restored[:size]
        sketch[start : start + size, :dims] = coordinates[:size]
        sketch[start : start + size, dims] = np.sqrt(np.einsum("ij,ij->i", centred[:size], centred[:size]))
    return sketch


def farthest_point_order(
    points: np.ndarray, n_select: int, first: int = 0, progress: bool = False, sketch_dims: int = 16,
    initial_nearest: np.ndarray | None = None, threads: int = 1,
) -> np.ndarray:
    """Greedy farthest-point selection of ``n_select`` rows of ``points``, starting at ``first``.

    Each pick is the row whose squared distance to its nearest earlier pick is the largest (the
    first such row on ties), distances measured in float32 as the sum of squared differences:
    exactly the plain greedy result, computed faster (see :func:`_farthest_point_order`).

    ``initial_nearest`` continues a selection: each point's squared distance to centres chosen
    before (not among ``points``); the first pick is then the point farthest from them.

    The small matrix products run on ``threads`` BLAS threads: give it only cores that are free
    (:func:`~patchcore.engine.cpus.free_cpus`). Split over two threads beside busy processes, each
    product waits for a thread kept off the CPU: at load 6 on this project's 2-core machine, a
    chunk of bottle's took 2.5x the wall time and 2.9x the CPU time on two threads than on one
    (the per-pick implementation before took 25x as long beside two busy processes, and was 1.5x
    faster on two idle cores than on one).
    """
    with threadpool_limits(limits=max(1, threads), user_api="blas"):
        return _farthest_point_order(np.ascontiguousarray(points, dtype=np.float32), n_select, first, progress,
                                     sketch_dims, initial_nearest)


def _farthest_point_order(
    points: np.ndarray, n_select: int, first: int, progress: bool, sketch_dims: int,
    initial_nearest: np.ndarray | None,
) -> np.ndarray:
    """The greedy order, in batches of picks that the plain loop would make one after the other.

    Batch: after the update for the picks so far, the farthest point is the next pick. Its
    stale distance is then set to zero and the next farthest point is taken as well, as long as
    none of the batch's picks lies nearer to it than its own distance: those picks leave its
    distance unchanged, and every other point's distance can only have shrunk, so it is exactly
    the point the plain loop would pick next (ties too: a point with the same distance and a
    smaller index would have come first). On bottle's patches a batch holds 6 picks on average,
    12 late in a selection.

    Update: one matrix product tests every point against all of the batch's picks with a cheap
    lower bound of their distance (the sketch distance of :func:`_bounding_sketch`); only the
    pairs it cannot rule out are measured exactly, and each point keeps the smallest distance.
    """
    n_points, dim = points.shape
    sketch = _bounding_sketch(points, min(sketch_dims, dim))
    half_norms = 0.5 * np.einsum("ij,ij->i", sketch, sketch)
    # A point's test column: its sketch, then 1 (which carries the new centre's -|s_c|^2 / 2).
    test_rows = np.empty((sketch.shape[1] + 1, n_points), dtype=np.float32)
    test_rows[:-1] = sketch.T
    test_rows[-1] = 1.0
    del sketch
    # Rounding of the expanded products (at most ~3e-6 of the largest half squared sketch norm,
    # 18 terms) must not rule out a point: the test keeps this much more.
    tolerance = np.float32(1e-5) * half_norms.max(initial=0.0)
    nearest = np.full(n_points, np.inf, dtype=np.float32)  # squared distance to the nearest centre
    if initial_nearest is not None:
        nearest[:] = initial_nearest
        first = int(np.argmax(nearest))
    # |s_p - s_c|^2 < SLACK * nearest_p  <=>  s_p.s_c - |s_c|^2 / 2 > limit_p
    limit = half_norms - 0.5 * SLACK * nearest - tolerance
    max_batch = int(min(32, max(4, BATCH_BYTES // (4 * n_points))))
    products = np.empty((max_batch, n_points), dtype=np.float32)
    passed = np.empty((max_batch, n_points), dtype=bool)
    differences = np.empty((min(PAIR_CHUNK, n_points), dim), dtype=np.float32)
    centres = np.empty((max_batch, dim), dtype=np.float32)
    chosen = np.empty(n_select, dtype=np.int64)
    done, candidate = 0, first
    bar = tqdm(total=n_select, desc="coreset", unit="pt", disable=not progress, mininterval=0.5)
    while done < n_select:
        size = 0
        while True:
            chosen[done + size] = candidate
            centres[size] = points[candidate]
            nearest[candidate] = 0.0
            size += 1
            if size == max_batch or done + size == n_select:
                break
            candidate = int(np.argmax(nearest))
            gaps = centres[:size] - points[candidate]
            if (np.einsum("ij,ij->i", gaps, gaps) < nearest[candidate]).any():
                break  # a pick of this batch may move it: measure first
        batch = chosen[done : done + size]
        done += size
        bar.update(size)
        if done == n_select:
            break
        limit[batch] = half_norms[batch] - tolerance
        centre_rows = test_rows[:, batch].T  # a copy: [s_c, -|s_c|^2 / 2] per pick
        centre_rows[:, -1] = -half_norms[batch]
        np.matmul(centre_rows, test_rows, out=products[:size])
        np.greater(products[:size], limit, out=passed[:size])
        centre_of, rows = np.divmod(np.flatnonzero(passed[:size]), n_points)  # grouped by centre
        squared = np.empty(len(rows), dtype=np.float32)
        bounds = np.searchsorted(centre_of, np.arange(size + 1))
        for index in range(size):
            for start in range(bounds[index], bounds[index + 1], PAIR_CHUNK):
                stop = min(start + PAIR_CHUNK, bounds[index + 1])
                part = differences[: stop - start]
                np.take(points, rows[start:stop], axis=0, out=part)
                part -= centres[index]
                np.einsum("ij,ij->i", part, part, out=squared[start:stop])
        before = nearest[rows]
        np.minimum.at(nearest, rows, squared)
        moved = rows[squared < before]
        limit[moved] = half_norms[moved] - 0.5 * SLACK * nearest[moved] - tolerance
        candidate = int(np.argmax(nearest))
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
