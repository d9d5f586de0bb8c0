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


def elpv_dataset(n_train: int, n_test_good: int, n_test_defective: int, seed: int,
                 n_calibration: int = 0) -> tuple[Dataset, list[Path]]:
    """ELPV mono-crystalline cells as a data set (good cells to fit on, held-out good and defective
    ones to test), and further held-out good cells to calibrate thresholds on."""
    split = split_elpv(load_elpv(), n_train, n_test_good, n_test_defective, cell_type="mono", seed=seed,
                       n_calibration=n_calibration)
    test = [TestSample(c.path, 0, "good") for c in split.test_good]
    test += [TestSample(c.path, 1, "defective") for c in split.test_defective]
    return Dataset("elpv-mono", [c.path for c in split.train], test), [c.path for c in split.calibration]


def verdict_counts(model, dataset: Dataset) -> tuple[int, int]:
    """How many defective and how many good test images of ``dataset`` the model's threshold flags."""
    scores = [p.score for p in model.predict([s.path for s in dataset.test], maps=False)]
    labels = [s.label for s in dataset.test]
    caught = sum(score >= model.threshold_ for score, label in zip(scores, labels) if label == 1)
    flagged_good = sum(score >= model.threshold_ for score, label in zip(scores, labels) if label == 0)
    return caught, flagged_good


def run_demo(output: Path, n_train: int = 200, seed: int = 0) -> int:
    """Fit on ``n_train`` good cells (its thresholds self-calibrated from them: no other folder),
    score held-out cells, print the table and the verdicts, write the report, and save the model
    (ready to serve)."""
    dataset, _ = elpv_dataset(n_train, DEMO_TEST_GOOD, DEMO_TEST_DEFECTIVE, seed)
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
    model.save(output / "model", event={"action": "fit", "who": "demo"})
    caught, flagged_good = verdict_counts(model, dataset)
    print(f"verdicts: thresholds {model.threshold_kind()} (false-positive rate <= {model.max_fpr:g}): image "
          f"{model.threshold_:.3f}, pixel {model.pixel_threshold_:.3f}; {model.threshold_estimate()}; on the test "
          f"cells it flags {caught} of {DEMO_TEST_DEFECTIVE} defective and {flagged_good} of {DEMO_TEST_GOOD} good cells")
    print(f"report: {output / dataset.name / 'report.html'}   model: {output / 'model'} "
          f"(serve it: patchcore serve {output / 'model'})")
    return 0
