"""Real data: MVTec AD bottle (from ../shared, skipped when absent) and ELPV (from PyPI)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import MVTEC_BOTTLE
from patchcore import PatchCore


@pytest.mark.slow
@pytest.mark.skipif(not MVTEC_BOTTLE.is_dir(), reason=f"MVTec AD bottle data not found at {MVTEC_BOTTLE}")
def test_mvtec_bottle_image_auroc_with_the_offline_default():
    train = sorted((MVTEC_BOTTLE / "train" / "good").glob("*.png"))
    test = sorted((MVTEC_BOTTLE / "test").glob("*/*.png"))
    labels = [0 if p.parent.name == "good" else 1 for p in test]
    model = PatchCore().fit(train)  # what a user deploys
    predictions = model.predict(test, maps=False)
    scores = [p.score for p in predictions]
    assert roc_auc_score(labels, scores) >= 0.99
    # Verdicts out of the box (README, "Verdicts out of the box"; docs/experiments.md's "every" row):
    # the self-calibrated threshold flags every defective test photo and none of the 20 good ones.
    assert model.threshold_kind() == "self-calibrated from 50 training photos"
    assert model.threshold_estimate().startswith("expected false-positive rate 2.0% (95% interval 0.05-7.1%")
    assert [p.is_anomalous for p in predictions] == [label == 1 for label in labels]


@pytest.mark.slow
def test_elpv_demo_pipeline_separates_solar_cells_well_above_chance(tmp_path):
    from patchcore.evaluation.demo import elpv_dataset
    from patchcore.evaluation.evaluate import evaluate_dataset

    # The demo's pipeline on a small fixed subset: 60 good cells to fit, 30 + 30 to test.
    dataset, _ = elpv_dataset(60, 30, 30, seed=0)
    result = evaluate_dataset(PatchCore(), dataset, tmp_path)
    print(f"ELPV subset image AUROC {result['image_auroc']:.3f}")
    assert result["image_auroc"] >= 0.85
    assert (tmp_path / "elpv-mono" / "report.html").is_file()
    assert np.isfinite(result["image_f1_threshold"])
    # The demo's verdicts come from the fit's own threshold (no held-out folder): it flags more of
    # the defective cells than of the good ones.
    from patchcore.evaluation.demo import verdict_counts

    model = PatchCore().fit(dataset.train)
    assert model.calibration_["method"] == "self" and model.calibration_["photos"] == 50
    caught, flagged_good = verdict_counts(model, dataset)
    print(f"self-calibrated threshold flags {caught}/30 defective and {flagged_good}/30 good cells")
    assert caught > flagged_good


@pytest.mark.slow
@pytest.mark.skipif(not MVTEC_BOTTLE.is_dir(), reason=f"MVTec AD bottle data not found at {MVTEC_BOTTLE}")
def test_auto_search_gives_the_image_scores_of_exact_search_on_a_bank_above_the_exact_limit():
    from patchcore.engine.approximate_search import ApproximateIndex

    train = sorted((MVTEC_BOTTLE / "train" / "good").glob("*.png"))[:24]
    test = [p for kind in ("good", "broken_small", "contamination")
            for p in sorted((MVTEC_BOTTLE / "test" / kind).glob("*.png"))[:5]]
    model = PatchCore(coreset_ratio=0.1).fit(train)  # the defaults otherwise: 24 x 2,304 patches -> 5,530 vectors
    assert isinstance(model.index_, ApproximateIndex) and model.memory_bank_.shape[0] > 4096
    with_hnsw = [p.score for p in model.predict(test, maps=False)]
    model.set_params(search_backend="numpy")._set_memory_bank(model.memory_bank_)
    exact = [p.score for p in model.predict(test, maps=False)]
    np.testing.assert_allclose(with_hnsw, exact, rtol=1e-6, atol=0)
