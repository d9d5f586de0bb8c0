"""``patchcore demo``: the whole job on real data that ships on PyPI (ELPV solar cells)."""

from __future__ import annotations

from pathlib import Path

from ..engine.model import PatchCore
from .datasets import Dataset, TestSample
from .elpv import load_elpv, split_elpv
from .evaluate import evaluate_dataset
from .summary import format_table

DEMO_TEST_GOOD = 100
DEMO_TEST_DEFECTIVE = 100
#: Further held-out good cells on which the saved model's thresholds are set.
DEMO_CALIBRATION = 100


def elpv_dataset(n_train: int, n_test_good: int, n_test_defective: int, seed: int,
                 n_calibration: int = 0) -> tuple[Dataset, list[Path]]:
    """ELPV mono-crystalline cells as a data set (good cells to fit on, held-out good and defective
    ones to test), and further held-out good cells to calibrate thresholds on."""
    split = split_elpv(load_elpv(), n_train, n_test_good, n_test_defective, cell_type="mono", seed=seed,
                       n_calibration=n_calibration)
    test = [TestSample(c.path, 0, "good") for c in split.test_good]
    test += [TestSample(c.path, 1, "defective") for c in split.test_defective]
    return Dataset("elpv-mono", [c.path for c in split.train], test), [c.path for c in split.calibration]


def run_demo(output: Path, n_train: int = 200, seed: int = 0) -> int:
    """Fit on ``n_train`` good cells, score held-out cells, print the table, write the report, and
    save a model whose thresholds were calibrated on other held-out good cells (ready to serve)."""
    dataset, calibration = elpv_dataset(n_train, DEMO_TEST_GOOD, DEMO_TEST_DEFECTIVE, seed, DEMO_CALIBRATION)
    print(
        f"ELPV solar cells (mono-crystalline, 300x300 electroluminescence), split seed {seed}: fit on "
        f"{len(dataset.train)} good cells; test on {DEMO_TEST_GOOD} held-out good cells and "
        f"{DEMO_TEST_DEFECTIVE} defective cells (defect probability 1)"
    )
    model = PatchCore(progress=True)
    result = evaluate_dataset(model, dataset, output)
    print(format_table([result]))
    print(
        f"image AUROC {result['image_auroc']:.3f}; best F1 {result['image_f1_max']:.3f} at score "
        f"threshold {result['image_f1_threshold']:.3f}"
    )
    model.calibrate_threshold(calibration, max_false_positive_rate=0.01)
    model.save(output / "model", event={"action": "fit", "who": "demo"})
    scores = [p.score for p in model.predict([s.path for s in dataset.test], maps=False)]
    labels = [s.label for s in dataset.test]
    flagged_good = sum(score >= model.threshold_ for score, label in zip(scores, labels) if label == 0)
    caught = sum(score >= model.threshold_ for score, label in zip(scores, labels) if label == 1)
    print(f"saved model thresholds from {len(calibration)} other held-out good cells (false-positive rate <= 1%): "
          f"image {model.threshold_:.3f}, pixel {model.pixel_threshold_:.3f}; on the test cells it flags "
          f"{caught} of {labels.count(1)} defective and {flagged_good} of {labels.count(0)} good cells")
    print(f"report: {output / dataset.name / 'report.html'}   model: {output / 'model'} "
          f"(serve it: patchcore serve {output / 'model'})")
    return 0
