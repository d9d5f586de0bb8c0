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
    model = PatchCore(coreset_ratio=0.1).fit(train)
    scores = [p.score for p in model.predict(test, maps=False)]
    assert roc_auc_score(labels, scores) >= 0.99


@pytest.mark.slow
def test_elpv_solar_cells_are_separated_well_above_chance():
    from patchcore.elpv import load_elpv, split_elpv

    split = split_elpv(load_elpv(), n_train=60, n_test_good=30, n_test_defective=30, cell_type="mono", seed=0)
    model = PatchCore(coreset_ratio=0.1).fit([c.path for c in split.train])
    scores = [p.score for p in model.predict([c.path for c in split.test_good + split.test_defective], maps=False)]
    auroc = roc_auc_score([0] * 30 + [1] * 30, scores)
    assert auroc >= 0.85
    assert np.isfinite(scores).all()
