"""``patchcore demo``: the whole job on real data that ships on PyPI (ELPV solar cells)."""

from __future__ import annotations

import time
from pathlib import Path

from sklearn.metrics import roc_auc_score

from .elpv import load_elpv, split_elpv
from .model import PatchCore

DEMO_TEST_GOOD = 100
DEMO_TEST_DEFECTIVE = 100


def run_demo(output: Path, n_train: int = 200, seed: int = 0) -> int:
    """Fit on ``n_train`` good mono-crystalline cells, test on held-out good and defective ones."""
    from .cli import write_predictions

    split = split_elpv(load_elpv(), n_train, DEMO_TEST_GOOD, DEMO_TEST_DEFECTIVE, cell_type="mono", seed=seed)
    print(
        f"ELPV mono cells, seed {seed}: fit on {len(split.train)} good cells; test on "
        f"{len(split.test_good)} held-out good and {len(split.test_defective)} defective cells (defect probability 1)"
    )
    started = time.perf_counter()
    model = PatchCore(progress=True).fit([cell.path for cell in split.train])
    fit_seconds = time.perf_counter() - started
    test = split.test_good + split.test_defective
    started = time.perf_counter()
    predictions = model.predict([cell.path for cell in test], maps=False)
    ms_per_image = 1000 * (time.perf_counter() - started) / len(test)
    labels = [0] * len(split.test_good) + [1] * len(split.test_defective)
    auroc = roc_auc_score(labels, [p.score for p in predictions])
    write_predictions(model, predictions, output)
    model.save(output / "model")
    good = sorted(p.score for p in predictions[: len(split.test_good)])
    bad = sorted(p.score for p in predictions[len(split.test_good) :])
    print(f"scores of good cells:      median {good[len(good) // 2]:.3f}  max {good[-1]:.3f}")
    print(f"scores of defective cells: median {bad[len(bad) // 2]:.3f}  max {bad[-1]:.3f}")
    print(
        f"image AUROC {auroc:.3f}  (fit {fit_seconds:.1f} s, memory bank {model.memory_bank_.shape[0]} patches, "
        f"{ms_per_image:.0f} ms per test image)"
    )
    print(f"wrote {output / 'scores.csv'}, {len(predictions)} overlays in {output / 'overlays'}, model in {output / 'model'}")
    return 0
