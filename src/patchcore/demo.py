"""``patchcore demo``: the whole job on real data that ships on PyPI (ELPV solar cells)."""

from __future__ import annotations

from pathlib import Path

from .datasets import Dataset, TestSample
from .elpv import load_elpv, split_elpv
from .evaluate import evaluate_dataset, format_table
from .model import PatchCore

DEMO_TEST_GOOD = 100
DEMO_TEST_DEFECTIVE = 100


def elpv_dataset(n_train: int, n_test_good: int, n_test_defective: int, seed: int) -> Dataset:
    """ELPV mono-crystalline cells as a dataset: good cells to fit on, held-out good and defective ones."""
    split = split_elpv(load_elpv(), n_train, n_test_good, n_test_defective, cell_type="mono", seed=seed)
    test = [TestSample(c.path, 0, "good") for c in split.test_good]
    test += [TestSample(c.path, 1, "defective") for c in split.test_defective]
    return Dataset("elpv-mono", [c.path for c in split.train], test)


def run_demo(output: Path, n_train: int = 200, seed: int = 0) -> int:
    """Fit on ``n_train`` good cells, score held-out cells, print the table, write the report."""
    dataset = elpv_dataset(n_train, DEMO_TEST_GOOD, DEMO_TEST_DEFECTIVE, seed)
    print(
        f"ELPV solar cells (mono-crystalline, 300x300 electroluminescence), split seed {seed}: fit on "
        f"{len(dataset.train)} good cells; test on {DEMO_TEST_GOOD} held-out good cells and "
        f"{DEMO_TEST_DEFECTIVE} defective cells (defect probability 1)"
    )
    model = PatchCore(progress=True)
    result = evaluate_dataset(model, dataset, output)
    model.save(output / "model")
    print(format_table([result]))
    print(
        f"image AUROC {result['image_auroc']:.3f}; best F1 {result['image_f1_max']:.3f} at score "
        f"threshold {result['image_f1_threshold']:.3f}"
    )
    print(f"report: {output / dataset.name / 'report.html'}   model: {output / 'model'}")
    return 0
