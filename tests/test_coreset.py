import numpy as np
import pytest

from patchcore.engine.coreset import coreset_size, coverage_radius, farthest_point_order, greedy_coreset


def _clustered(n=6000, dim=64, seed=0, latent=8):
    """Points near a few clusters on a low-dimensional subspace, as CNN patch features are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (30, latent))
    codes = centres[rng.integers(0, 30, n)] + rng.normal(0, 1, (n, latent))
    return (codes @ rng.normal(size=(latent, dim)) + rng.normal(0, 0.05, (n, dim))).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_selection_is_the_greedy_farthest_point_order(seed):
    points = _clustered(seed=seed)
    chosen = farthest_point_order(points, 400, first=7)
    assert chosen[0] == 7 and len(set(chosen.tolist())) == 400
    # Each pick is the point farthest from those picked before (in float64, up to float32 rounding).
    exact = points.astype(np.float64)
    nearest = np.full(len(points), np.inf)
    for previous, pick in zip(chosen[:-1], chosen[1:]):
        nearest = np.minimum(nearest, ((exact - exact[previous]) ** 2).sum(1))
        assert nearest[pick] >= nearest.max() * (1 - 1e-5)


def test_coverage_radius_beats_random_subsets():
    features = _clustered(n=8000, dim=256, latent=3)  # projected to 128 dims for the selection
    kept = greedy_coreset(features, ratio=0.02, seed=0)
    assert len(kept) == len(set(kept.tolist())) == 160
    greedy_radius = coverage_radius(features, kept)
    rng = np.random.default_rng(0)
    random_radii = [coverage_radius(features, rng.choice(len(features), 160, replace=False)) for _ in range(3)]
    assert greedy_radius < 0.8 * min(random_radii)


def test_seeded_and_sized():
    features = _clustered(n=2000, dim=32)
    first = greedy_coreset(features, 0.05, seed=3)
    assert np.array_equal(first, greedy_coreset(features, 0.05, seed=3))
    assert len(first) == coreset_size(2000, 0.05) == 100
    assert np.array_equal(greedy_coreset(features, 1.0), np.arange(2000))
    assert coreset_size(10, 0.001) == 1


@pytest.mark.parametrize("ratio", [0.0, 0.0009, 1.5, -0.1])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="coreset ratio"):
        greedy_coreset(np.zeros((10, 4), np.float32), ratio)


def test_greedy_is_exact_on_vectors_with_a_large_common_offset():
    """The expanded distance |p|^2 - 2 p.c + |c|^2 loses precision when every vector shares a large
    offset; centring first keeps the picks those of float64 greedy."""
    rng = np.random.default_rng(5)
    spread = rng.standard_normal((3000, 16)).astype(np.float32)
    offset = np.float32(300.0) * np.abs(spread).max()
    shifted = spread + offset
    picks = greedy_coreset(shifted, 0.1, projection_dim=128, seed=0)
    first = int(np.random.default_rng(0).integers(len(spread)))
    expected = [first]
    nearest = np.full(len(spread), np.inf)
    points = shifted.astype(np.float64)  # float64 greedy on the very vectors given
    for _ in range(len(picks) - 1):
        nearest = np.minimum(nearest, ((points - points[expected[-1]]) ** 2).sum(axis=1))
        expected.append(int(np.argmax(nearest)))
    assert picks.tolist() == expected


def test_chunked_greedy_above_the_exact_limit_covers_nearly_as_well():
    rng = np.random.default_rng(6)
    centres = rng.standard_normal((40, 8)).astype(np.float32) * 5
    points = centres[rng.integers(40, size=20000)] + rng.standard_normal((20000, 8)).astype(np.float32)
    exact = greedy_coreset(points, 0.01, seed=0)
    chunked = greedy_coreset(points, 0.01, seed=0, exact_limit=5000, chunk_size=5000)
    assert len(chunked) == len(exact) == 200 and len(set(chunked.tolist())) == 200
    assert coverage_radius(points, chunked) <= 1.25 * coverage_radius(points, exact)
    assert not np.array_equal(np.sort(chunked), np.sort(exact))  # it is another selection
