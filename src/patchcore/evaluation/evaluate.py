"""Fit and test a detector on labelled data sets, as in the paper, and write what was measured.

Per data set: fit on the good training images, score every test image, and report image AUROC
(overall and per defect type), pixel AUROC and AUPRO over every pixel of the photos (or, with
``eval_size``, on resized maps and masks), F1-max, fit time, inference time and memory-bank size.
With an output folder, each data set also gets overlays, ROC and PRO curves and ``report.html``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..engine.evidence import evidence_picture
from ..engine.images import read_image, unique_names
from ..engine.model import PatchCore
from ..engine.overlay import save_png
from . import metrics
from .datasets import Dataset, TestSample, load_mask, load_mvtec_category, mvtec_categories
from .figures import AUPRO_FPR_LIMIT, plot_curves
from .panels import panel_size, resize_map, resize_mask, three_panels
from .report import report_html, worst_cases
from .summary import KEYS, json_default, percent, write_summary


def log(message: str) -> None:
    """Progress for people, on stderr (stdout may carry JSON)."""
    print(message, file=sys.stderr, flush=True)


def defect_aurocs(samples: Sequence[TestSample], scores: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type against the good test images (types in name order)."""
    good = [score for sample, score in zip(samples, scores) if sample.label == 0]
    result = {}
    if not good:
        return result
    for defect in sorted({sample.defect_type for sample in samples if sample.label == 1}):
        bad = [score for sample, score in zip(samples, scores) if sample.label == 1 and sample.defect_type == defect]
        result[defect] = metrics.image_auroc([0] * len(good) + [1] * len(bad), np.r_[good, bad])
    return result


def _bank_size(model) -> int:
    """Vectors the model keeps: its memory bank's rows, or the sum over an ensemble's members."""
    size = getattr(model, "memory_bank_size_", None)
    return int(size if size is not None else model.memory_bank_.shape[0])


def evaluate_dataset(model, dataset: Dataset, output: Path | None, eval_size: int | None = None, fit: bool = True) -> dict:
    """Fit ``model`` on ``dataset.train`` (unless ``fit`` is False: then it must be fitted), score
    ``dataset.test`` and compute the metrics.

    Pixel metrics use the anomaly maps and masks at full image resolution, or, with ``eval_size``,
    maps (bilinear) and masks (nearest) resized to ``eval_size`` x ``eval_size``. Each photo is
    decoded once. Returns a dict with :data:`KEYS` plus extras (``pixel_eval_size``, F1-max values
    and thresholds, counts, timings). With ``output``, writes overlays, ``roc.png``, ``pro.png``
    and ``report.html`` to ``output/<name>/``.
    """
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"eval_size must be a positive number of pixels, got {eval_size}")
    if not dataset.test:
        raise ValueError(f"{dataset.name}: no test images")
    if fit:
        started = time.perf_counter()
        model.fit(dataset.train)
        fit_seconds = time.perf_counter() - started
    else:
        fit_seconds = float(sum(getattr(model, "fit_timings_", {}).values()))

    with_masks = dataset.has_masks
    samples = list(dataset.test)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    scores = np.empty(len(samples), dtype=np.float64)
    pixels = metrics.PixelScores(len(samples))  # each map's pixels, added as it arrives (full size or eval_size)
    panels: list[tuple[Image.Image, np.ndarray, np.ndarray | None]] = []  # small photo, map, mask
    stage_seconds: dict[str, float] = {}
    predict_seconds = 0.0
    with_evidence = output is not None and getattr(model, "memory_bank_origin_", None) is not None
    evidence: list[list] = []
    predictions = model.iter_predict([s.path for s in samples], maps=True, keep_images=output is not None,
                                     **({"evidence": 1} if with_evidence else {}))
    for i, sample in enumerate(samples):
        t0 = time.perf_counter()
        prediction = next(predictions)
        predict_seconds += time.perf_counter() - t0
        for stage, seconds in prediction.timings.items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
        scores[i] = prediction.score
        evidence.append(prediction.evidence)
        amap = np.asarray(prediction.anomaly_map, dtype=np.float32)
        height, width = amap.shape
        mask = load_mask(sample, (height, width)) if (with_masks or sample.mask_path is not None) else None
        if output is not None:
            size = panel_size(height, width)
            photo = prediction.image.resize(size, Image.BILINEAR)
            panels.append((photo, resize_map(amap, size), None if mask is None else resize_mask(mask, size)))
        prediction.anomaly_map = prediction.mask = prediction.image = None
        if with_masks:
            if eval_size is not None:
                amap = resize_map(amap, (eval_size, eval_size))
                mask = resize_mask(mask, (eval_size, eval_size))
            pixels.add(mask, amap)
        del amap, mask
    next(predictions, None)  # none left: running the predictions to their end hands the network's memory back

    both_classes = 0 < labels.sum() < labels.size
    result: dict[str, Any] = {
        "category": dataset.name,
        "image_auroc": metrics.image_auroc(labels, scores) if both_classes else None,
        "pixel_auroc": None,
        "aupro": None,
        "fit_seconds": fit_seconds,
        "ms_per_image": 1000.0 * predict_seconds / len(samples),
        "memory_bank_size": _bank_size(model),
        "backbone": str(model.backbone),
        "coreset_ratio": float(model.coreset_ratio),
        "defect_image_auroc": defect_aurocs(samples, scores),
        "pixel_eval_size": ("full" if eval_size is None else int(eval_size)) if with_masks else None,
        "image_f1_max": None,
        "image_f1_threshold": None,
        "pixel_f1_max": None,
        "pixel_f1_threshold": None,
        "n_train": len(dataset.train),
        "n_test_good": int((labels == 0).sum()),
        "n_test_defective": int((labels == 1).sum()),
        "feature_dim": int(model.memory_bank_.shape[1]) if hasattr(model, "memory_bank_") else None,
        # What fitting held in memory (every training patch's features) and what the model keeps.
        "feature_matrix_mib": (model.n_training_patches_ * model.memory_bank_.shape[1] * 4 / 2**20
                               if hasattr(model, "n_training_patches_") else None),
        "bank_mib": model.memory_bank_.nbytes / 2**20 if hasattr(model, "memory_bank_") else None,
        "fit_timings": {k: float(v) for k, v in getattr(model, "fit_timings_", {}).items()},
        **{f"ms_{stage}": 1000.0 * seconds / len(samples) for stage, seconds in stage_seconds.items()},
    }
    if labels.any():
        result["image_f1_max"], result["image_f1_threshold"] = metrics.f1_max(labels, scores)
    curves: dict[str, Any] = {}
    if both_classes:
        curves["image_roc"] = metrics.roc_curve_points(labels, scores)
    if with_masks:
        pixel = pixels.pixel_metrics()
        result["pixel_auroc"] = pixel["auroc"]
        result["pixel_f1_max"], result["pixel_f1_threshold"] = pixel["f1_max"], pixel["f1_threshold"]
        curves["pixel_roc"] = pixel["roc"]
        fpr, pro = pixels.pro_curve()
        result["aupro"] = metrics.area_under_pro(fpr, pro, AUPRO_FPR_LIMIT)
        curves["pro"] = (fpr, pro)
    del pixels

    if output is not None:
        _write_outputs(Path(output) / dataset.name, result, samples, scores, panels, curves, evidence)
    return result


def _write_outputs(folder: Path, result: dict, samples: list[TestSample], scores: np.ndarray,
                   panels: list[tuple[Image.Image, np.ndarray, np.ndarray | None]], curves: dict,
                   evidence: list[list]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    low = min(float(m.min()) for _, m, _ in panels)
    high = max(float(m.max()) for _, m, _ in panels)
    if result["pixel_f1_threshold"] is not None:
        pixel_threshold, threshold_source = result["pixel_f1_threshold"], "pixel F1-max threshold"
    elif result["image_f1_threshold"] is not None:
        pixel_threshold, threshold_source = result["image_f1_threshold"], "image F1-max threshold"
    else:
        pixel_threshold, threshold_source = high, "highest score (no defective images)"
    stems = unique_names([f"{sample.defect_type}_{Path(sample.path).name}" for sample in samples])
    files = []
    for stem, (photo, panel_map, panel_mask) in zip(stems, panels):
        name = f"images/{stem}.png"
        save_png(three_panels(photo, panel_map, panel_mask, low, high, pixel_threshold), folder / name)
        files.append(name)
    result["overlay_threshold"] = float(pixel_threshold)
    evidence_files: dict[int, tuple[str, object]] = {}
    for i in worst_cases(samples, scores):  # the cases the report shows: their evidence, as pictures
        if evidence[i]:
            name = f"images/{stems[i]}-evidence.png"
            save_png(evidence_picture(read_image(samples[i].path), evidence[i][0]), folder / name)
            evidence_files[i] = (name, evidence[i][0])
    curve_files = plot_curves(folder, result, curves)
    (folder / "metrics.json").write_text(json.dumps(result, indent=2, default=json_default) + "\n")
    (folder / "report.html").write_text(report_html(result, samples, scores, files, curve_files, threshold_source,
                                                    evidence_files), encoding="utf-8")


# -- several data sets -----------------------------------------------------------------------


def evaluate_datasets(
    loaders: Sequence[tuple[str, Callable[[], Dataset]]],
    make_model: Callable[[], Any],
    output: str | Path | None,
    eval_size: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Evaluate each ``(name, load)`` data set with a fresh model from ``make_model()``.

    One that fails is reported to stderr and recorded as a row with an ``error`` key; the others
    still run. After each, ``metrics.json`` (rows + mean) and ``metrics.csv`` are rewritten in
    ``output``. Returns the rows (without the mean row).
    """
    output = Path(output) if output is not None else None
    rows: list[dict] = []
    for number, (name, load) in enumerate(loaders, 1):
        started = time.perf_counter()
        if progress:
            log(f"[{number}/{len(loaders)}] {name}: evaluating")
        try:
            made = make_model()
            model = PatchCore(**made) if isinstance(made, dict) else made
            row = evaluate_dataset(model, load(), output, eval_size)
            if progress:
                log(f"[{number}/{len(loaders)}] {name}: image AUROC {percent(row['image_auroc'])}, pixel AUROC "
                    f"{percent(row['pixel_auroc'])}, AUPRO {percent(row['aupro'])} ({time.perf_counter() - started:.1f}s)")
        except Exception as error:  # one bad data set must not stop the others
            message = f"{type(error).__name__}: {error}"
            log(f"error: {name} failed: {message}")
            row = {key: None for key in KEYS}
            row["category"] = name
            row["error"] = message
        rows.append(row)
        if output is not None:
            write_summary(output, rows)
    return rows


def evaluate_categories(root: str | Path, categories: Sequence[str] | None, make_model: Callable[[], Any],
                        output: str | Path | None, eval_size: int | None = None, progress: bool = True) -> list[dict]:
    """Evaluate each MVTec category under ``root`` (all of them when ``categories`` is None)."""
    root = Path(root)
    names = list(categories) if categories else mvtec_categories(root)
    loaders = [(name, lambda name=name: load_mvtec_category(root, name)) for name in names]
    return evaluate_datasets(loaders, make_model, output, eval_size, progress)


def is_plain_layout(root: str | Path) -> bool:
    """A plain folder layout: ``good/`` beside defect folders, not an MVTec category (``train/good``)."""
    root = Path(root)
    return (root / "good").is_dir() and not (root / "train" / "good").is_dir()


def resolve_root(root: str | Path, categories: Sequence[str] | None) -> tuple[Path, list[str] | None]:
    """(MVTec root, categories): a single category folder (with ``train/good``) is its own category."""
    root = Path(root)
    if (root / "train" / "good").is_dir():
        name = root.resolve().name
        if categories and list(categories) != [name]:
            raise ValueError(f"{root} is the single category {name!r}; --category {' '.join(categories)} does not match")
        return root.resolve().parent, [name]
    return root, list(categories) if categories else None
