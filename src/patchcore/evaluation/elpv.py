"""The ELPV solar-cell data set (Deitsch et al.), read from the ``elpv-dataset`` PyPI package.

2,624 electroluminescence images of solar cells, 300x300 grayscale, each labelled with the
probability (0, 1/3, 2/3 or 1) that the cell is defective, and the cell type (mono or poly).
It ships with its images, so everything here works offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ElpvCell:
    path: Path
    defect_probability: float
    cell_type: str  # "mono" or "poly"


def elpv_root() -> Path:
    """Folder of the installed data set (holding ``labels.csv`` and ``images/``)."""
    try:
        import elpv_dataset
    except ImportError as exc:
        raise RuntimeError("the ELPV data set comes from the package 'elpv-dataset': pip install elpv-dataset") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def load_elpv(root: Path | None = None) -> list[ElpvCell]:
    """Every labelled cell of the data set, in file order."""
    root = root or elpv_root()
    cells = []
    for line_number, line in enumerate((root / "labels.csv").read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3:
            raise ValueError(f"{root / 'labels.csv'}:{line_number}: expected 'path probability type', got {line!r}")
        cells.append(ElpvCell(root / fields[0], float(fields[1]), fields[2]))
    return cells


@dataclass(frozen=True)
class ElpvSplit:
    train: list[ElpvCell]  # good cells to fit on
    test_good: list[ElpvCell]  # held-out good cells
    test_defective: list[ElpvCell]
    calibration: list[ElpvCell]  # further held-out good cells, to set thresholds on


def split_elpv(
    cells: list[ElpvCell],
    n_train: int,
    n_test_good: int,
    n_test_defective: int,
    cell_type: str | None = "mono",
    min_defect_probability: float = 1.0,
    seed: int = 0,
    n_calibration: int = 0,
) -> ElpvSplit:
    """A seeded split: good cells (probability 0) for training, testing and calibrating
    thresholds, defective ones (probability >= ``min_defect_probability``) for testing; optionally
    one cell type only. The four sets are disjoint."""
    if cell_type is not None:
        cells = [c for c in cells if c.cell_type == cell_type]
    good = [c for c in cells if c.defect_probability == 0.0]
    defective = [c for c in cells if c.defect_probability >= min_defect_probability]
    if n_train + n_test_good + n_calibration > len(good) or n_test_defective > len(defective):
        raise ValueError(
            f"asked for {n_train}+{n_test_good}+{n_calibration} good and {n_test_defective} defective cells; "
            f"the data set has {len(good)} good and {len(defective)} defective {cell_type or ''} cells"
        )
    rng = np.random.default_rng(seed)
    good_order = rng.permutation(len(good))
    defective_order = rng.permutation(len(defective))
    return ElpvSplit(
        train=[good[i] for i in good_order[:n_train]],
        test_good=[good[i] for i in good_order[n_train : n_train + n_test_good]],
        test_defective=[defective[i] for i in defective_order[:n_test_defective]],
        calibration=[good[i] for i in good_order[n_train + n_test_good : n_train + n_test_good + n_calibration]],
    )
