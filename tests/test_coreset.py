import numpy as np
import pytest

from conftest import MVTEC_BOTTLE
from patchcore.engine.coreset import (
    coreset_size,
    coverage_radius,
    farthest_point_order,
    greedy_coreset,
    projected,
    projection_matrix,
    select_coreset,
)


def _clustered(n=6000, dim=64, seed=0, latent=8):
    """Points near a few clusters on a low-dimensional subspace, as CNN patch features are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (30, latent))
    codes = centres[rng.integers(0, 30, n)] + rng.normal(0, 1, (n, latent))
    return (codes @ rng.normal(size=(latent, dim)) + rng.normal(0, 0.05, (n, dim))).astype(np.float32)


def _plain_greedy(points, n_select, first=0, initial_nearest=None):
    """The plain loop the coreset is documented to be: each pick the point with the largest float32
    squared distance (sum of squared differences) to its nearest earlier pick, the first on ties."""
    nearest = np.full(len(points), np.inf, np.float32) if initial_nearest is None else initial_nearest.astype(np.float32)
    pick = first if initial_nearest is None else int(np.argmax(nearest))
    picks = []
    for _ in range(n_select):
        picks.append(pick)
        differences = points - points[pick]
        np.minimum(nearest, np.einsum("ij,ij->i", differences, differences), out=nearest)
        pick = int(np.argmax(nearest))
    return np.array(picks)


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


@pytest.mark.parametrize("seed, n, dim, n_select", [(0, 6000, 64, 600), (1, 3000, 128, 1500), (2, 20000, 16, 300),
                                                    (3, 500, 8, 499)])
def test_picks_are_exactly_the_plain_loops(seed, n, dim, n_select):
    """Batched picks and pruned updates change nothing: the same indices in the same order, from
    the first pick (batches of one) to half the points (batches at their largest)."""
    points = projected(_clustered(n=n, dim=dim, seed=seed), None)
    assert np.array_equal(farthest_point_order(points, n_select, first=seed), _plain_greedy(points, n_select, seed))


def test_ties_go_to_the_first_index_as_in_the_plain_loop():
    """Exact duplicates (identical patches are common: flat background) tie exactly; the plain loop
    takes the first, and so does every batch, also once every distinct point is picked."""
    rng = np.random.default_rng(4)
    base = rng.standard_normal((300, 24)).astype(np.float32)
    points = base[rng.integers(0, 300, 2400)]  # each vector about 8 times, shuffled
    distinct = len(np.unique(points, axis=0))
    picks = farthest_point_order(points, distinct + 20, first=5)
    assert np.array_equal(picks, _plain_greedy(points, distinct + 20, 5))
    assert len(set(picks[:distinct].tolist())) == distinct


def test_continuing_from_earlier_centres_is_the_plain_loop_too():
    points = projected(_clustered(n=4000, dim=32, seed=5), None)
    bank = _clustered(n=200, dim=32, seed=6) - points.mean(axis=0)
    initial = np.min(((points[:, None, :] - bank[None, :, :]) ** 2).sum(-1), axis=1).astype(np.float32)
    assert np.array_equal(farthest_point_order(points, 300, initial_nearest=initial),
                          _plain_greedy(points, 300, initial_nearest=initial))


def test_chunked_selection_is_the_plain_loop_per_chunk_then_over_the_union():
    features = _clustered(n=12000, dim=96, seed=7)
    kept = select_coreset(features, 240, seed=3, exact_limit=5000, chunk_size=4000)
    matrix = projection_matrix(96, 128, 3)  # narrower than 128: no projection
    union = []
    for start in range(0, 12000, 4000):
        union.append(start + np.sort(_plain_greedy(projected(features[start : start + 4000], matrix), 160)))
    union = np.concatenate(union)
    assert np.array_equal(kept, union[_plain_greedy(projected(features[union], matrix), 240)])


@pytest.mark.slow
@pytest.mark.skipif(not MVTEC_BOTTLE.is_dir(), reason=f"MVTec AD bottle data not found at {MVTEC_BOTTLE}")
def test_picks_on_real_bottle_patches_are_the_plain_loops():
    """Real patch features (4 bottle photos at the defaults: 9,216 patches of 168 values, projected
    to 128 as in a fit), where near-ties between patches of the same background are frequent."""
    from patchcore import PatchCore

    photos = sorted((MVTEC_BOTTLE / "train" / "good").glob("*.png"))[:4]
    with PatchCore().extract_patches(photos) as store:
        features = store.read(0, len(store))
    points = projected(features, projection_matrix(features.shape[1], 128, 0))
    n_select = coreset_size(len(points), 0.1)
    assert np.array_equal(farthest_point_order(points, n_select, first=11), _plain_greedy(points, n_select, 11))


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
