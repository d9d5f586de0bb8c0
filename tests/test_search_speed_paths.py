"""The fast paths of scoring (issue 17): blocked exact search, the float16 HNSW walk with float32
distances, batched exact re-checks and eq. 7, maps as two matrix products, and the thread choice."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bank_only_detector
from scipy.ndimage import gaussian_filter

from patchcore.engine import search
from patchcore.engine.approximate_search import ApproximateIndex
from patchcore.engine.geometry import InputTransform, Placement
from patchcore.engine.scoring import anomaly_map, axis_operator, network_map, resize_bilinear
from patchcore.engine.search import MemoryBankIndex, exact_distances


# -- maps ---------------------------------------------------------------------------------------


def former_network_map(grid: np.ndarray, placement: Placement, sigma: float) -> np.ndarray:
    """The map at network resolution as it was made before: whole images through each step."""
    rows, columns = grid.shape
    upsampled = resize_bilinear(grid, (rows * placement.cell, columns * placement.cell))
    content = upsampled[: placement.content_size[0], : placement.content_size[1]]
    smoothed = gaussian_filter(content, sigma=sigma, mode="reflect") if sigma > 0 else content
    return np.ascontiguousarray(smoothed, dtype=np.float32)


def former_anomaly_map(grid: np.ndarray, placement: Placement, sigma: float) -> np.ndarray:
    smoothed = former_network_map(grid, placement, sigma)
    height, width = placement.image_size
    box_left, box_top, box_right, box_bottom = placement.box
    left, right = max(0, round(box_left)), min(width, max(round(box_right), round(box_left) + 1))
    top, bottom = max(0, round(box_top)), min(height, max(round(box_bottom), round(box_top) + 1))
    inside = resize_bilinear(smoothed, (bottom - top, right - left))
    return np.pad(inside, ((top, height - bottom), (left, width - right)), mode="edge")


PLACEMENTS = [
    Placement((900, 900), (0.0, 0.0, 900.0, 900.0), (384, 384), (384, 384), 8),  # bottle at the defaults
    Placement((1000, 1500), (0.0, 0.0, 1500.0, 1000.0), (384, 576), (384, 576), 8),  # a 1500x1000 photo
    Placement((900, 900), (50.0, 50.0, 850.0, 850.0), (224, 224), (224, 224), 8),  # centre crop
    Placement((256, 360), (0, 0, 360, 256), (256, 360), (256, 384), 8),  # stride padding cut off
    InputTransform(384, None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 32, 8).placement(1234, 777),  # odd sizes
]


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: f"{p.image_size}")
@pytest.mark.parametrize("sigma", [4.0, 2.5, 0.0])
def test_maps_equal_the_former_step_by_step_maps_to_1e_5(placement, sigma):
    rng = np.random.default_rng(0)
    grid = rng.uniform(0.5, 6.0, placement.grid_size).astype(np.float32)
    grid[2:5, 3:6] += 20.0  # a defect: steep edges
    for made, former in ((anomaly_map(grid, placement, sigma), former_anomaly_map(grid, placement, sigma)),
                         (network_map(grid, placement, sigma), former_network_map(grid, placement, sigma))):
        assert made.shape == former.shape and made.dtype == np.float32 and made.flags.c_contiguous
        np.testing.assert_allclose(made, former, rtol=1e-5, atol=0)


def test_the_maps_operators_are_cached_and_read_only():
    axis_operator.cache_clear()
    first = axis_operator(48, 8, 384, 4.0, 0, 900, 900)
    assert axis_operator(48, 8, 384, 4.0, 0, 900, 900) is first and axis_operator.cache_info().hits == 1
    assert first.shape == (900, 48) and first.dtype == np.float32 and not first.flags.writeable
    # Each output pixel is a weighted mean of the grid: rows sum to one (a flat grid stays flat).
    np.testing.assert_allclose(first.sum(axis=1), 1.0, atol=1e-6)


def test_predict_without_maps_makes_no_map_and_with_maps_one_per_photo(product_images, fitted_model, monkeypatch):
    from patchcore.engine import detector

    calls = []
    real = detector.anomaly_map
    monkeypatch.setattr(detector, "anomaly_map", lambda *a, **k: calls.append(1) or real(*a, **k))
    images = product_images["good"][:3]
    assert all(p.anomaly_map is None for p in fitted_model.predict(images, maps=False)) and calls == []
    with_maps = fitted_model.predict(images)
    assert len(calls) == 3 and all(p.anomaly_map.shape == (64, 64) for p in with_maps)


# -- search -------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 7, None])
@pytest.mark.parametrize("k", [1, 4])
def test_exact_search_in_query_blocks_finds_the_brute_force_neighbours(block_size, k):
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(3000, 32)).astype(np.float32) + 5.0  # off-centre: the index centres it
    queries = rng.normal(size=(100, 32)).astype(np.float32) + 5.0
    index = MemoryBankIndex(bank, block_size=block_size)
    distances, indices = index.search(queries, k)
    brute = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1))
    assert np.array_equal(indices, np.argsort(brute, axis=1)[:, :k])
    np.testing.assert_allclose(distances, np.sort(brute, axis=1)[:, :k], rtol=1e-5)
    # distances() measures given neighbours as search does, to the bit.
    assert np.array_equal(index.distances(queries, indices), distances)


def test_the_float16_hnsw_walk_returns_true_float32_distances_even_where_float16_cannot_tell_vectors_apart():
    rng = np.random.default_rng(2)
    # Clusters of near-duplicates that differ below float16's resolution at this scale (~0.03 at
    # 64): float16 sees each cluster as one vector and picks any member, float32 tells them apart.
    centres = rng.normal(size=(40, 16)).astype(np.float32) * 8 + 64
    bank = (np.repeat(centres, 25, axis=0) + rng.normal(size=(1000, 16)).astype(np.float32) * 0.004)
    queries = bank[rng.choice(len(bank), 200)] + rng.normal(size=(200, 16)).astype(np.float32) * 0.004
    index = ApproximateIndex(bank, "hnsw")
    distances, indices = index.search(queries, 3)
    assert np.array_equal(distances, exact_distances(queries, bank, indices))  # float32, measured
    assert np.all(np.diff(distances, axis=1) >= 0)  # nearest first
    true = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)).min(axis=1)
    assert np.all(distances[:, 0] >= true * (1 - 1e-5))  # an approximate neighbour is never nearer
    assert np.mean(distances[:, 0] > true * (1 + 1e-3)) > 0.2  # float16 really could not tell them apart


class Misleading:
    """An approximate index that misses on purpose: for every query farther than ``far`` from the
    bank (the anomalous patches, where real indexes miss most) it returns the bank vector
    *farthest* from the query, and for the ``share`` of the other queries it picks, the second
    nearest (a near miss, which the re-checks of the highest patches do not reach)."""

    def __init__(self, bank: np.ndarray, share: float, far: float, seed: int = 0) -> None:
        self.memory_bank, self.size = bank, len(bank)
        self.share, self.far, self.rng = share, far, np.random.default_rng(seed)

    def neighbours(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        squared = ((queries[:, None, :] - self.memory_bank[None]) ** 2).sum(-1)
        order = np.argsort(squared, axis=1)
        far = squared.min(axis=1) > self.far**2
        near_miss = ~far & (self.rng.random(len(queries)) < self.share)
        indices = np.where(far, order[:, -1], np.where(near_miss, order[:, 1], order[:, 0]))[:, None]
        return indices, np.take_along_axis(squared, indices, 1)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        indices, squared = self.neighbours(queries, k)
        return np.sqrt(squared), indices


def images_and_bank(seed: int = 3) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(600, 24)).astype(np.float32)
    images = []
    for i in range(5):
        patches = bank[rng.choice(600, 400)] + rng.normal(size=(400, 24)).astype(np.float32) * 0.3
        patches[rng.choice(400, 3 + i, replace=False)] += rng.normal(size=(3 + i, 24)).astype(np.float32) * (2 + i)
        images.append(patches)  # a few anomalous patches, at different strengths
    return images, bank


@pytest.mark.parametrize("reweight", [True, False])
def test_image_scores_equal_exact_searchs_to_the_bit_when_the_first_pass_misses_on_purpose(reweight):
    images, bank = images_and_bank()
    exact = bank_only_detector(bank, reweight=reweight)
    expected = [exact.score_images([patches])[0] for patches in images]
    misled = bank_only_detector(bank, reweight=reweight)
    misled.index_ = Misleading(bank, share=0.2, far=2.5)  # every anomalous patch missed, and 20% of the rest
    for (scores, nearest, score), (true_scores, true_nearest, true_score), patches in zip(
            misled.score_images(images), expected, images):
        assert score == true_score  # to the bit
        top = int(np.argmax(true_scores))
        assert misled.index_.neighbours(patches[top : top + 1])[0][0, 0] != true_nearest[top]  # missed ...
        assert scores.max() == true_scores.max() and nearest[top] == true_nearest[top]  # ... and re-checked
        assert np.all(scores >= true_scores)  # the rest may stay high, never low ...
        right = nearest == true_nearest
        assert np.array_equal(scores[right], true_scores[right])  # ... and equal where the neighbour was right
        assert not right.all()


def test_scoring_several_images_at_once_gives_each_ones_own_scores_to_the_bit():
    images, bank = images_and_bank(4)
    model = bank_only_detector(bank)
    model.index_ = ApproximateIndex(bank, "hnsw", hnsw_neighbours=4, ef_search=2)  # a poor index: re-checks work
    together = model.score_images(images)
    for patches, (scores, nearest, score) in zip(images, together):
        alone_scores, alone_nearest = model.score_patches(patches)
        assert np.array_equal(scores, alone_scores) and np.array_equal(nearest, alone_nearest)
        assert score == model.image_score(alone_scores, alone_nearest, patches)


def test_auto_search_is_exact_up_to_the_limit_and_hnsw_above():
    from patchcore.engine.detector import AUTO_EXACT_LIMIT

    rng = np.random.default_rng(5)
    at_limit = bank_only_detector(rng.normal(size=(AUTO_EXACT_LIMIT, 8)).astype(np.float32), search_backend="auto")
    above = bank_only_detector(rng.normal(size=(AUTO_EXACT_LIMIT + 1, 8)).astype(np.float32), search_backend="auto")
    assert isinstance(at_limit.index_, MemoryBankIndex)
    assert isinstance(above.index_, ApproximateIndex) and above.index_.kind == "hnsw"


# -- threads ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.wall = self.own = 0.0

    def monotonic(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.own


def test_search_threads_follow_the_cores_that_other_processes_leave_idle(monkeypatch):
    clock, busy = Clock(), [0.0]
    monkeypatch.setattr(search, "time", clock)
    monkeypatch.setattr(search, "available_cpus", lambda: 4)
    monkeypatch.setattr(search, "busy_seconds", lambda cpus=None: busy[0])
    cores = search.IdleCores()
    assert cores.free() == 1  # nothing measured yet

    def after(seconds: float, ours: float, others: float, limit: int | None = None) -> int:
        clock.wall += seconds
        clock.own += ours
        busy[0] += ours + others
        return cores.free(limit)

    assert after(1.0, ours=2.0, others=0.0) == 4  # only this process was busy (its network): all free
    assert after(1.0, ours=1.0, others=2.9) == 1  # others kept ~3 of 4 cores busy
    assert after(1.0, ours=0.5, others=1.0) == 3
    assert after(1.0, ours=0.0, others=0.0, limit=2) == 2  # the model's threads setting caps it
    assert after(0.03, ours=0.0, others=0.12) == 4  # too short to tell (all 4 busy): the previous answer ...
    assert after(0.03, ours=0.0, others=0.0) == 2  # ... and the next look covers both: 2 of 4 cores busy


def test_search_threads_hold_numpy_and_faiss_threads_and_restore_them():
    import faiss
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}

    before_blas, before_faiss = blas_threads(), faiss.omp_get_max_threads()
    with search.search_threads(1):
        assert blas_threads() == {1} and faiss.omp_get_max_threads() == 1
    assert blas_threads() == before_blas and faiss.omp_get_max_threads() == before_faiss


@pytest.mark.skipif(not __import__("os").path.exists("/proc/stat"), reason="needs /proc/stat (Linux)")
def test_busy_seconds_counts_the_cores_this_process_may_use():
    import os

    mine = search.busy_seconds()
    every = search.busy_seconds(set(range(os.cpu_count() or 1)))
    assert mine is not None and 0 < mine <= every + 0.5
    assert search.busy_seconds(set()) == 0.0  # no core, no busy time
