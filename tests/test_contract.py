"""The estimator contract (scikit-learn's), refits, thresholds, and subtle defects a broken pipeline would miss."""

import numpy as np
import pytest
from sklearn.base import clone

from conftest import FAST, product_image, small_model_settings, subtle_defect
from patchcore import PatchCore


def test_get_params_set_params_and_clone_follow_scikit_learn():
    model = PatchCore(coreset_ratio=0.05, layers=("blocks.2", "blocks.4"), resize=(384, 256))
    params = model.get_params(deep=True)
    assert params["coreset_ratio"] == 0.05 and params["resize"] == (384, 256)
    assert model.set_params(coreset_ratio=0.2, crop=224) is model
    assert (model.coreset_ratio, model.crop) == (0.2, 224)
    with pytest.raises(ValueError, match="Invalid parameter"):
        model.set_params(no_such_setting=1)
    copy = clone(model)
    assert copy is not model and copy.get_params() == model.get_params()
    assert copy.layers == model.layers and copy.resize == (384, 256)


def test_clone_of_a_fitted_model_is_unfitted(fitted_model):
    copy = clone(fitted_model)
    assert not [name for name in vars(copy) if name.endswith("_")]
    assert copy.get_params() == fitted_model.get_params()


def test_refit_forgets_everything_learned_before(product_images):
    model = PatchCore(**small_model_settings()).fit(product_images["train"])
    model.calibrate_threshold(product_images["good"])
    assert model.threshold_ is not None and model.pixel_threshold_ is not None
    assert model.calibration_["method"] == "held-out"
    model.fit(product_images["train"][:6])  # the default: thresholds from its own 6 photos, the held-out ones gone
    assert model.calibration_["method"] == "self" and model.calibration_["photos"] == 6
    assert model.calibration_["names"] == [str(path) for path in product_images["train"][:6]]
    model.set_params(calibration="none").fit(product_images["train"][:6])
    for name in ("threshold_", "pixel_threshold_", "threshold_source_", "calibration_"):
        assert getattr(model, name) is None, name
    assert model.n_training_images_ == 6
    prediction = model.predict(product_images["defective"][0])[0]
    assert prediction.is_anomalous is None and prediction.mask is None


def test_pixel_threshold_is_calibrated_on_pixel_maps_not_image_scores(product_images):
    model = PatchCore(**small_model_settings()).fit(product_images["train"])
    model.calibrate_threshold(product_images["good"], max_false_positive_rate=0.0, max_pixel_false_positive_rate=0.01)
    good = model.predict(product_images["good"])
    # At most 1% of the good images' pixels reach the pixel threshold (maps resampled to full size
    # keep their distribution up to the resampling).
    share = np.mean(np.concatenate([p.anomaly_map.ravel() for p in good]) >= model.pixel_threshold_)
    assert share <= 0.02
    assert model.pixel_threshold_ < model.threshold_  # smoothed maps sit below eq. 7 image scores
    for i, prediction in enumerate(model.predict(product_images["defective"])):
        # The blotch covers rows 20+4i .. 34+4i, cols 24 .. 38: the mask covers much of it, not just its peak.
        blotch = prediction.mask[20 + 4 * i : 34 + 4 * i, 24:38]
        assert blotch.mean() > 0.5 and prediction.is_anomalous


@pytest.fixture(scope="module")
def subtle(tmp_path_factory):
    """Good 96x64 textures, and textures with a scratch, a faint spot or a changed weave."""
    rng = np.random.default_rng(11)
    train = [product_image(rng, (64, 96)) for _ in range(10)]
    good = [product_image(rng, (64, 96)) for _ in range(6)]
    defective, masks = [], []
    for i, kind in enumerate(["scratch", "spot", "texture"] * 2):
        image, mask = subtle_defect(product_image(rng, (64, 96)), kind, 10 + 8 * (i % 3), 10 + 25 * (i % 3), rng)
        defective.append(image)
        masks.append(mask)
    return train, good, defective, masks


def test_subtle_defects_are_ranked_and_located_by_imagenet_features_only(subtle):
    from sklearn.metrics import roc_auc_score

    train, good, defective, masks = subtle
    labels = [0] * len(good) + [1] * len(defective)
    model = PatchCore(**FAST, resize=128, coreset_ratio=0.25).fit(train)
    predictions = model.predict(good + defective)
    assert roc_auc_score(labels, [p.score for p in predictions]) == 1.0
    for prediction, mask in zip(predictions[len(good):], masks):
        row, col = np.unravel_index(np.argmax(prediction.anomaly_map), mask.shape)
        assert mask[max(0, row - 4) : row + 5, max(0, col - 4) : col + 5].any()  # the peak is on the defect
    # The same pipeline with meaningless features cannot tell them apart: the test can fail.
    broken = PatchCore(**FAST, resize=128, coreset_ratio=0.25, weights="random").fit(train)
    assert roc_auc_score(labels, [p.score for p in broken.predict(good + defective, maps=False)]) < 0.75
