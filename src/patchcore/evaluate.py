"""The ``patchcore evaluate`` command: fit and test on MVTec-style categories, as in the paper.

Per category: fit on ``train/good``, score every test image, and report image AUROC, pixel AUROC
and AUPRO (at full mask resolution, or with ``eval_size`` on resized maps and masks), F1-max,
fit time, inference time and memory-bank size. With an output folder, each category also gets
overlays, ROC and PRO curves and a self-contained ``report.html``.

This module must not import :mod:`patchcore.cli` at module level (cli imports it).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from . import metrics
from .datasets import Dataset, TestSample, load_folder_layout, load_mask, load_mvtec_category, mvtec_categories
from .images import read_image, unique_names
from .model import PatchCore
from .overlay import colourise

#: The keys of every result row (``metrics.json``, ``metrics.csv``, ``--json``), in order.
KEYS = (
    "category",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "fit_seconds",
    "ms_per_image",
    "memory_bank_size",
    "backbone",
    "coreset_ratio",
)
#: Side of each panel of the overlay images (pixels, longer side).
PANEL_SIZE = 256
#: FPR limit of the AUPRO (as in the MVTec AD paper).
AUPRO_FPR_LIMIT = 0.3
#: Thresholds tried for the pixel F1-max and the pixel ROC curve (histogram bin edges).
PIXEL_THRESHOLDS = 4096

_GT_COLOUR = (0, 230, 0)
_PRED_COLOUR = (255, 0, 255)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- per-image bookkeeping -------------------------------------------------------------------


def _panel_size(height: int, width: int, limit: int = PANEL_SIZE) -> tuple[int, int]:
    """(width, height) of a panel: the image scaled so that its longer side is at most ``limit``."""
    scale = min(1.0, limit / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size`` = (width, height), float32."""
    if (amap.shape[1], amap.shape[0]) == size:
        return np.asarray(amap, dtype=np.float32)
    return np.asarray(Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32)).resize(size, Image.BILINEAR), dtype=np.float32)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``size`` = (width, height)."""
    if (mask.shape[1], mask.shape[0]) == size:
        return np.asarray(mask, dtype=bool)
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0


# -- metrics helpers -------------------------------------------------------------------------


def _pixel_counts(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], bins: int = PIXEL_THRESHOLDS):
    """Thresholds (ascending) and, for each, the anomalous and normal pixels scored at or above it.

    Histograms, one image at a time: no copy of all pixels is made.
    """
    low = min(float(m.min()) for m in maps)
    high = max(float(m.max()) for m in maps)
    if high <= low:
        high = low + 1e-6
    edges = np.linspace(low, high, bins + 1)
    positive = np.zeros(bins, dtype=np.int64)
    negative = np.zeros(bins, dtype=np.int64)
    for mask, amap in zip(masks, maps):
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            positive += np.histogram(amap[mask], bins=edges)[0]
        if not mask.all():
            negative += np.histogram(amap[~mask], bins=edges)[0]
    # Pixels >= edges[i] are those in bins i.. (the last bin includes its right edge).
    tp = np.cumsum(positive[::-1])[::-1]
    fp = np.cumsum(negative[::-1])[::-1]
    return edges[:-1], tp, fp


def _pixel_f1_and_roc(masks, maps) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Pixel F1-max and its threshold, and pixel ROC points, on :data:`PIXEL_THRESHOLDS` thresholds."""
    thresholds, tp, fp = _pixel_counts(masks, maps)
    positives, negatives = int(tp[0]), int(fp[0])
    precision = np.divide(tp, tp + fp, out=np.zeros(tp.shape), where=(tp + fp) > 0)
    recall = tp / max(positives, 1)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    best = int(np.argmax(f1))
    fpr = np.r_[0.0, (fp / max(negatives, 1))[::-1], 1.0]
    tpr = np.r_[0.0, recall[::-1], 1.0]
    return float(f1[best]), float(thresholds[best]), fpr, tpr


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _public(row: dict) -> dict:
    """A row with exactly :data:`KEYS` (and ``error`` when the category failed)."""
    public = {key: row.get(key) for key in KEYS}
    if row.get("error") is not None:
        public["error"] = row["error"]
    return public


def mean_row(rows: Sequence[dict]) -> dict:
    """The ``"mean"`` row: averages over the successful categories (None where there are no values)."""
    ok = [row for row in rows if row.get("error") is None and row.get("category") != "mean"]
    mean: dict[str, Any] = {"category": "mean"}
    for key in KEYS[1:]:
        values = [row.get(key) for row in ok]
        if key == "backbone":
            names = sorted({str(v) for v in values if v is not None})
            mean[key] = names[0] if len(names) == 1 else (", ".join(names) or None)
        else:
            mean[key] = _mean_or_none(values)
    return mean


# -- one data set ----------------------------------------------------------------------------


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


def evaluate_dataset(model: PatchCore, dataset: Dataset, output: Path | None, eval_size: int | None = None) -> dict:
    """Fit ``model`` on ``dataset.train``, score ``dataset.test`` and compute the metrics.

    Pixel metrics use the anomaly maps and masks at full image resolution, or, with ``eval_size``,
    maps (bilinear) and masks (nearest) resized to ``eval_size`` x ``eval_size``. Returns a dict with
    :data:`KEYS` plus extras (``pixel_eval_size``, F1-max values and thresholds, counts, timings).
    With ``output``, writes overlays, ``roc.png``, ``pro.png`` and ``report.html`` to
    ``output/<category>/``.
    """
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"eval_size must be a positive number of pixels, got {eval_size}")
    if not dataset.test:
        raise ValueError(f"{dataset.name}: no test images")
    started = time.perf_counter()
    model.fit(dataset.train)
    fit_seconds = time.perf_counter() - started

    with_masks = dataset.has_masks
    samples = list(dataset.test)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    scores = np.empty(len(samples), dtype=np.float64)
    metric_maps: list[np.ndarray] = []  # float32, full size or eval_size
    metric_masks: list[np.ndarray] = []
    panel_maps: list[np.ndarray] = []  # small maps for the overlays
    panel_masks: list[np.ndarray | None] = []
    predict_seconds = 0.0
    predictions = model.iter_predict([s.path for s in samples], maps=True)
    for i, sample in enumerate(samples):
        t0 = time.perf_counter()
        prediction = next(predictions)
        predict_seconds += time.perf_counter() - t0
        scores[i] = prediction.score
        amap = np.asarray(prediction.anomaly_map, dtype=np.float32)
        prediction.anomaly_map = prediction.mask = None
        height, width = amap.shape
        panel = _panel_size(height, width)
        panel_maps.append(_resize_map(amap, panel))
        mask = None
        if with_masks or sample.mask_path is not None:
            mask = load_mask(sample, (height, width))
            panel_masks.append(_resize_mask(mask, panel))
        else:
            panel_masks.append(None)
        if with_masks:
            if eval_size is not None:
                amap = _resize_map(amap, (eval_size, eval_size))
                mask = _resize_mask(mask, (eval_size, eval_size))
            metric_maps.append(amap)
            metric_masks.append(mask)
        del amap, mask
    predictions.close()

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
        "pixel_eval_size": ("full" if eval_size is None else int(eval_size)) if with_masks else None,
        "image_f1_max": None,
        "image_f1_threshold": None,
        "pixel_f1_max": None,
        "pixel_f1_threshold": None,
        "n_train": len(dataset.train),
        "n_test_good": int((labels == 0).sum()),
        "n_test_defective": int((labels == 1).sum()),
        "feature_dim": int(model.memory_bank_.shape[1]) if hasattr(model, "memory_bank_") else None,
        "fit_timings": {k: float(v) for k, v in getattr(model, "fit_timings_", {}).items()},
    }
    result["defect_image_auroc"] = defect_aurocs(samples, scores)
    if labels.any():
        result["image_f1_max"], result["image_f1_threshold"] = metrics.f1_max(labels, scores)
    curves: dict[str, Any] = {}
    if both_classes:
        curves["image_roc"] = metrics.roc_curve_points(labels, scores)
    if with_masks:
        result["pixel_auroc"] = metrics.pixel_auroc(metric_masks, metric_maps)
        fpr, pro = metrics.pro_curve_points(metric_masks, metric_maps)
        result["aupro"] = metrics.area_under_pro(fpr, pro, AUPRO_FPR_LIMIT)
        curves["pro"] = (fpr, pro)
        f1, threshold, pixel_fpr, pixel_tpr = _pixel_f1_and_roc(metric_masks, metric_maps)
        result["pixel_f1_max"], result["pixel_f1_threshold"] = f1, threshold
        curves["pixel_roc"] = (pixel_fpr, pixel_tpr)
    del metric_maps, metric_masks

    if output is not None:
        _write_category_outputs(Path(output) / dataset.name, result, samples, scores, panel_maps, panel_masks, curves)
    return result


# -- outputs of one category -----------------------------------------------------------------


def _outline(mask: np.ndarray) -> np.ndarray:
    """A 2-pixel-wide outline of a bool mask."""
    if not mask.any():
        return mask
    edge = mask ^ ndimage.binary_erosion(mask, border_value=0)
    return ndimage.binary_dilation(edge)


def _overlay_image(sample: TestSample, panel_map: np.ndarray, panel_mask: np.ndarray | None,
                   low: float, high: float, pixel_threshold: float) -> Image.Image:
    """Three panels: the image (with its ground truth outlined), the heat map, and the prediction."""
    height, width = panel_map.shape
    image = read_image(sample.path).resize((width, height), Image.BILINEAR)
    original = np.asarray(image, dtype=np.uint8).copy()
    heat = colourise(panel_map, low, high)
    blended = (0.5 * original + 0.5 * heat).astype(np.uint8)
    predicted = original.copy()
    predicted[_outline(panel_map >= pixel_threshold)] = _PRED_COLOUR
    if panel_mask is not None:
        gt = _outline(panel_mask)
        original[gt] = _GT_COLOUR
        blended[gt] = _GT_COLOUR
        predicted[gt] = _GT_COLOUR
    gap = 6
    canvas = Image.new("RGB", (3 * width + 2 * gap, height), "white")
    for k, panel in enumerate((original, blended, predicted)):
        canvas.paste(Image.fromarray(panel), (k * (width + gap), 0))
    return canvas


def _plot_curves(folder: Path, result: dict, curves: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    figure, axes = plt.subplots(figsize=(4.6, 4.2), dpi=100)
    if "image_roc" in curves:
        axes.plot(*curves["image_roc"], label=f"image (AUROC {100 * result['image_auroc']:.1f})", color="#1f77b4")
    if "pixel_roc" in curves:
        axes.plot(*curves["pixel_roc"], label=f"pixel (AUROC {100 * result['pixel_auroc']:.1f})", color="#d62728")
    axes.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02),
             title=f"ROC - {result['category']}")
    if curves.get("image_roc") is not None or curves.get("pixel_roc") is not None:
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "needs good and defective test images", ha="center")
    figure.tight_layout()
    figure.savefig(folder / "roc.png")
    plt.close(figure)
    written["roc"] = "roc.png"

    figure, axes = plt.subplots(figsize=(4.6, 4.2), dpi=100)
    if "pro" in curves:
        fpr, pro = curves["pro"]
        if fpr.size > 20000:  # plotting only: thin the exact curve
            keep = np.unique(np.r_[np.linspace(0, fpr.size - 1, 20000).astype(np.int64), fpr.size - 1])
            fpr, pro = fpr[keep], pro[keep]
        axes.plot(fpr, pro, color="#2ca02c", label=f"AUPRO@{AUPRO_FPR_LIMIT} {100 * result['aupro']:.1f}")
        axes.axvline(AUPRO_FPR_LIMIT, linestyle="--", color="grey", linewidth=1)
        inside = fpr <= AUPRO_FPR_LIMIT
        fill_x = np.r_[fpr[inside], AUPRO_FPR_LIMIT]
        fill_y = np.r_[pro[inside], np.interp(AUPRO_FPR_LIMIT, fpr, pro)]
        axes.fill_between(fill_x, fill_y, color="#2ca02c", alpha=0.15)
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "no ground-truth masks", ha="center")
    axes.set(xlabel="false positive rate (pixels)", ylabel="per-region overlap", xlim=(0, 1), ylim=(0, 1.02),
             title=f"PRO - {result['category']}")
    figure.tight_layout()
    figure.savefig(folder / "pro.png")
    plt.close(figure)
    written["pro"] = "pro.png"
    return written


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_category_outputs(folder: Path, result: dict, samples: list[TestSample], scores: np.ndarray,
                            panel_maps: list[np.ndarray], panel_masks: list, curves: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "images"
    images.mkdir(exist_ok=True)
    low = min(float(m.min()) for m in panel_maps)
    high = max(float(m.max()) for m in panel_maps)
    if result["pixel_f1_threshold"] is not None:
        pixel_threshold, threshold_source = result["pixel_f1_threshold"], "pixel F1-max threshold"
    elif result["image_f1_threshold"] is not None:
        pixel_threshold, threshold_source = result["image_f1_threshold"], "image F1-max threshold"
    else:
        pixel_threshold, threshold_source = high, "highest score (no defective images)"
    stems = unique_names([f"{sample.defect_type}_{Path(sample.path).stem}" for sample in samples])
    files = []
    for sample, stem, panel_map, panel_mask in zip(samples, stems, panel_maps, panel_masks):
        name = f"images/{stem}.png"
        _overlay_image(sample, panel_map, panel_mask, low, high, pixel_threshold).save(folder / name)
        files.append(name)
    result["overlay_threshold"] = float(pixel_threshold)
    curve_files = _plot_curves(folder, result, curves)
    (folder / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    (folder / "report.html").write_text(
        _report_html(result, samples, scores, files, curve_files, threshold_source), encoding="utf-8"
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;font-size:.92rem} td,th{padding:.3rem .8rem;border-bottom:1px solid #eee;text-align:left}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.curves img{border:1px solid #ddd;margin-right:1rem}
.grid{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:.5rem;background:#fafafa}
figure img{display:block;max-width:100%} figcaption{font-size:.85rem;color:#444;margin-top:.3rem}
.legend span{display:inline-block;width:.9rem;height:.9rem;vertical-align:middle;margin:0 .3rem 0 1rem;border-radius:2px}
details{margin-top:1rem}
"""


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"
    return html.escape(str(value))


def _defect_section(result: dict) -> str:
    aurocs = result.get("defect_image_auroc") or {}
    if not aurocs:
        return ""
    rows = "".join(f"<tr><td>{html.escape(defect)}</td><td class='num'>{_fmt(value, True)} %</td></tr>"
                   for defect, value in aurocs.items())
    return ("<h2>Image AUROC per defect type</h2><p class='sub'>Each defect type against the good test images.</p>"
            f"<table><tr><th>defect type</th><th>image AUROC</th></tr>{rows}</table>")


def _report_html(result: dict, samples: list[TestSample], scores: np.ndarray, files: list[str],
                 curve_files: dict[str, str], threshold_source: str) -> str:
    esc = html.escape
    percent_keys = {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"}
    rows = []
    for key, value in result.items():
        if key == "defect_image_auroc":
            continue
        if key == "fit_timings":
            value = ", ".join(f"{k} {v:.2f}s" for k, v in value.items())
        shown = _fmt(value, key in percent_keys) + (" %" if key in percent_keys and value is not None else "")
        rows.append(f"<tr><th>{esc(key)}</th><td class='num'>{shown}</td></tr>")

    def gallery(indices: list[int], empty: str) -> str:
        if not indices:
            return f"<p class='sub'>{esc(empty)}</p>"
        figures = []
        for i in indices:
            sample = samples[i]
            figures.append(
                f"<figure><img src='{esc(files[i])}' alt='{esc(Path(sample.path).name)}' loading='lazy'>"
                f"<figcaption><b>{esc(sample.defect_type)}/{esc(Path(sample.path).name)}</b> - score {scores[i]:.4f}"
                f"</figcaption></figure>"
            )
        return "<div class='grid'>" + "".join(figures) + "</div>"

    good = [i for i, s in enumerate(samples) if s.label == 0]
    defective = [i for i, s in enumerate(samples) if s.label == 1]
    worst_fp = sorted(good, key=lambda i: -scores[i])[:6]
    worst_fn = sorted(defective, key=lambda i: scores[i])[:6]
    threshold = result.get("image_f1_threshold")
    all_rows = "".join(
        f"<tr><td>{esc(s.defect_type)}</td><td><a href='{esc(files[i])}'>{esc(Path(s.path).name)}</a></td>"
        f"<td class='num'>{scores[i]:.4f}</td>"
        f"<td>{'' if threshold is None else ('anomalous' if scores[i] >= threshold else 'good')}</td></tr>"
        for i, s in sorted(enumerate(samples), key=lambda item: -scores[item[0]])
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>PatchCore evaluation - {esc(result['category'])}</title>
<style>{_CSS}</style></head><body>
<h1>PatchCore evaluation: {esc(result['category'])}</h1>
<p class="sub">{esc(str(result['backbone']))}, coreset ratio {result['coreset_ratio']}, memory bank {result['memory_bank_size']} patches;
pixel metrics at {esc(str(result['pixel_eval_size'] or 'n/a'))} resolution</p>
<h2>Metrics</h2>
<table>{''.join(rows)}</table>
{_defect_section(result)}
<h2>Curves</h2>
<div class="curves"><img src="{esc(curve_files['roc'])}" alt="ROC curve"><img src="{esc(curve_files['pro'])}" alt="PRO curve"></div>
<h2>Overlays</h2>
<p class="legend">Each image: original | heat map | prediction.
<span style="background:rgb{_PRED_COLOUR}"></span>predicted region ({esc(threshold_source)}, {result['overlay_threshold']:.4f})
<span style="background:rgb{_GT_COLOUR}"></span>ground truth</p>
<h2>Worst false positives (highest-scoring good images)</h2>
{gallery(worst_fp, "no good test images")}
<h2>Worst false negatives (lowest-scoring defective images)</h2>
{gallery(worst_fn, "no defective test images")}
<details><summary>All {len(samples)} test images by score (decision at the image F1-max threshold)</summary>
<table><tr><th>type</th><th>image</th><th>score</th><th>decision</th></tr>{all_rows}</table></details>
</body></html>
"""


# -- several categories ----------------------------------------------------------------------


def _write_summary(output: Path, rows: list[dict]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    public = [_public(row) for row in rows] + [mean_row(rows)]
    tmp = output / "metrics.json.tmp"
    tmp.write_text(json.dumps(public, indent=2, default=_json_default) + "\n")
    tmp.replace(output / "metrics.json")
    tmp = output / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*KEYS, "error"])
        writer.writeheader()
        for row in public:
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in (*KEYS, "error")})
    tmp.replace(output / "metrics.csv")


def evaluate_categories(
    root: str | Path,
    categories: Sequence[str] | None,
    settings_factory: Callable[[], PatchCore | dict],
    output: str | Path | None,
    eval_size: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Evaluate each MVTec category under ``root`` (all of them when ``categories`` is None).

    See :func:`evaluate_datasets`; returns the rows (without the mean row).
    """
    root = Path(root)
    names = list(categories) if categories else mvtec_categories(root)
    loaders = [(name, lambda name=name: load_mvtec_category(root, name)) for name in names]
    return evaluate_datasets(loaders, settings_factory, output, eval_size, progress)


def evaluate_datasets(
    loaders: Sequence[tuple[str, Callable[[], Dataset]]],
    settings_factory: Callable[[], PatchCore | dict],
    output: str | Path | None,
    eval_size: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Evaluate each ``(name, load)`` data set with a fresh model from ``settings_factory()``.

    ``settings_factory()`` gives a fresh :class:`PatchCore` (or a dict of its settings) per data set.
    One that fails is reported to stderr and recorded as a row with an ``error`` key; the others
    still run. After each, ``metrics.json`` (rows + mean) and ``metrics.csv`` are rewritten in
    ``output``. Returns the rows (without the mean row).
    """
    output = Path(output) if output is not None else None
    rows: list[dict] = []
    for number, (category, load) in enumerate(loaders, 1):
        started = time.perf_counter()
        if progress:
            _log(f"[{number}/{len(loaders)}] {category}: evaluating")
        try:
            made = settings_factory()
            model = PatchCore(**made) if isinstance(made, dict) else made
            dataset = load()
            row = evaluate_dataset(model, dataset, output, eval_size)
            if progress:
                _log(f"[{number}/{len(loaders)}] {category}: image AUROC {_pct(row['image_auroc'])}, pixel AUROC "
                     f"{_pct(row['pixel_auroc'])}, AUPRO {_pct(row['aupro'])} ({time.perf_counter() - started:.1f}s)")
        except Exception as error:  # one bad data set must not stop the others
            message = f"{type(error).__name__}: {error}"
            _log(f"error: {category} failed: {message}")
            row = {key: None for key in KEYS}
            row["category"] = category
            row["error"] = message
        rows.append(row)
        if output is not None:
            _write_summary(output, rows)
    return rows


# -- text table ------------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(rows: Sequence[dict]) -> str:
    """A paper-like table: AUROCs and AUPRO in percent with one decimal; the mean row last."""
    rows = list(rows)
    body = [row for row in rows if row.get("category") != "mean"]
    mean = next((row for row in rows if row.get("category") == "mean"), None) or mean_row(body)
    header = ("category", "image AUROC", "pixel AUROC", "AUPRO", "fit s", "ms/img", "bank size")

    def cells(row: dict) -> list[str]:
        if row.get("error") is not None:
            return [str(row["category"]), f"error: {row['error']}"]
        num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        return [
            str(row["category"]),
            _pct(row.get("image_auroc")),
            _pct(row.get("pixel_auroc")),
            _pct(row.get("aupro")),
            num(row.get("fit_seconds"), ".1f"),
            num(row.get("ms_per_image"), ".1f"),
            num(row.get("memory_bank_size"), ".0f"),
        ]

    table = [cells(row) for row in body]
    mean_cells = cells(mean)
    widths = [len(h) for h in header]
    for line in table + [mean_cells]:
        if len(line) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, line)]
    widths[0] = max([widths[0]] + [len(line[0]) for line in table] + [len(mean_cells[0])])

    def render(line: list[str]) -> str:
        if len(line) != len(header):  # an error row
            return f"{line[0]:<{widths[0]}}  {line[1]}"
        return "  ".join([f"{line[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(line[1:], widths[1:])])

    rule = "-" * len(render(list(header)))
    lines = [render(list(header)), rule, *(render(line) for line in table), rule, render(mean_cells)]
    return "\n".join(lines + format_defect_table(body))


def format_defect_table(rows: Sequence[dict]) -> list[str]:
    """Lines of image AUROC per defect type (each against the good test images), or none."""
    entries = [(str(row["category"]), defect, auroc) for row in rows
               for defect, auroc in (row.get("defect_image_auroc") or {}).items()]
    if not entries:
        return []
    width = max(len("category"), *(len(c) for c, _, _ in entries))
    defect_width = max(len("defect type"), *(len(d) for _, d, _ in entries))
    lines = ["", f"{'category':<{width}}  {'defect type':<{defect_width}}  image AUROC"]
    lines += [f"{c:<{width}}  {d:<{defect_width}}  {_pct(a):>11}" for c, d, a in entries]
    return lines


# -- command line ----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, got {value}")
    return value


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``patchcore evaluate`` on ``subparsers``."""
    from .cli import add_model_options  # lazily: cli imports this module

    parser = subparsers.add_parser(
        "evaluate",
        help="fit and test on MVTec AD categories; print AUROC/AUPRO as in the paper",
        description="For each MVTec AD category: fit on train/good, score test/*, and report image AUROC, "
                    "pixel AUROC, AUPRO, fit time, inference time and memory-bank size. Writes metrics.json, "
                    "metrics.csv and per category overlays, ROC/PRO curves and report.html.",
    )
    parser.add_argument("root", metavar="ROOT",
                        help="MVTec AD root folder, one category folder (with train/good), or a plain folder layout: "
                             "ROOT/good/ and one folder per defect type (masks optional, see --masks)")
    parser.add_argument("--train", default=None, metavar="DIR",
                        help="plain layout: the good training images (default: ROOT/train/, else a seeded split of ROOT/good/)")
    parser.add_argument("--masks", default=None, metavar="DIR",
                        help="plain layout: masks named <stem>.png or <stem>_mask.png, flat or in a folder per defect "
                             "type (default: ROOT/masks/ or ROOT/ground_truth/ when present)")
    parser.add_argument("--test-share", type=float, default=0.2,
                        help="plain layout without training images: share of ROOT/good/ held out for testing (default: 0.2)")
    parser.add_argument("--category", dest="categories", action="extend", nargs="+", default=None, metavar="C",
                        help="categories to evaluate (default: every category under ROOT)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for metrics and reports")
    parser.add_argument("--json", action="store_true", help="print only the JSON results to stdout (progress to stderr)")
    parser.add_argument("--eval-size", type=_positive_int, default=None, metavar="N",
                        help="compute pixel metrics on maps and masks resized to N x N (default: full resolution)")
    add_model_options(parser)
    parser.set_defaults(handler=run_evaluate)
    return parser


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


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``patchcore evaluate``: 0 when every category was evaluated, 1 when any failed."""
    from .cli import model_from_args

    if is_plain_layout(args.root):
        root = Path(args.root)
        loaders = [(root.resolve().name, lambda: load_folder_layout(root, args.train, args.masks, args.test_share))]
        rows = evaluate_datasets(loaders, lambda: model_from_args(args), Path(args.output), eval_size=args.eval_size)
    else:
        root, categories = resolve_root(args.root, args.categories)
        if categories is None:
            categories = mvtec_categories(root)
        rows = evaluate_categories(root, categories, lambda: model_from_args(args), Path(args.output),
                                   eval_size=args.eval_size, progress=True)
    if args.json:
        print(json.dumps([_public(row) for row in rows] + [mean_row(rows)], indent=2, default=_json_default))
    else:
        print(format_table(rows + [mean_row(rows)]))
        print(f"wrote {Path(args.output) / 'metrics.json'}, metrics.csv and a report.html per category")
    return 1 if any(row.get("error") is not None for row in rows) else 0
