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
