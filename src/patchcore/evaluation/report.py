"""``report.html``: one self-contained page per evaluated data set (metrics, curves, worst cases)."""

from __future__ import annotations

import html
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import TestSample
from .panels import GROUND_TRUTH_COLOUR, PREDICTED_COLOUR

_PERCENT_KEYS = {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"}


def _css() -> str:
    return (resources.files("patchcore.evaluation") / "report.css").read_text(encoding="utf-8")


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"
    return html.escape(str(value))


def _metrics_table(result: dict) -> str:
    rows = []
    for key, value in result.items():
        if key == "defect_image_auroc":
            continue
        if key == "fit_timings":
            value = ", ".join(f"{k} {v:.2f}s" for k, v in value.items())
        shown = _fmt(value, key in _PERCENT_KEYS) + (" %" if key in _PERCENT_KEYS and value is not None else "")
        rows.append(f"<tr><th>{html.escape(key)}</th><td class='num'>{shown}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def _defect_section(result: dict) -> str:
    aurocs = result.get("defect_image_auroc") or {}
    if not aurocs:
        return ""
    rows = "".join(f"<tr><td>{html.escape(defect)}</td><td class='num'>{_fmt(value, True)} %</td></tr>"
                   for defect, value in aurocs.items())
    return ("<h2>Image AUROC per defect type</h2><p class='sub'>Each defect type against the good test images.</p>"
            f"<table><tr><th>defect type</th><th>image AUROC</th></tr>{rows}</table>")


#: How many of the worst false positives and false negatives the report shows.
WORST_SHOWN = 6


def worst_cases(samples: list[TestSample], scores: np.ndarray) -> list[int]:
    """The highest-scoring good images and the lowest-scoring defective ones that the report shows."""
    good = [i for i, s in enumerate(samples) if s.label == 0]
    defective = [i for i, s in enumerate(samples) if s.label == 1]
    return sorted(good, key=lambda i: -scores[i])[:WORST_SHOWN] + sorted(defective, key=lambda i: scores[i])[:WORST_SHOWN]


def _evidence_block(item: tuple[str, object] | None) -> str:
    if item is None:
        return ""
    picture, evidence = item
    return (f"<img src='{html.escape(picture)}' alt='the most anomalous patch beside its nearest normal patch' "
            f"loading='lazy'><figcaption>why: the most anomalous patch (left) is {evidence.distance:.3f} from its "
            f"nearest normal patch (right), {html.escape(Path(evidence.training_image).name)} row "
            f"{evidence.training_row} column {evidence.training_column}</figcaption>")


def _gallery(indices: list[int], samples: list[TestSample], scores: np.ndarray, files: list[str], empty: str,
             evidence: dict) -> str:
    esc = html.escape
    if not indices:
        return f"<p class='sub'>{esc(empty)}</p>"
    figures = [
        f"<figure><img src='{esc(files[i])}' alt='{esc(Path(samples[i].path).name)}' loading='lazy'>"
        f"<figcaption><b>{esc(samples[i].defect_type)}/{esc(Path(samples[i].path).name)}</b> - score {scores[i]:.4f}"
        f"</figcaption>{_evidence_block(evidence.get(i))}</figure>"
        for i in indices
    ]
    return "<div class='grid'>" + "".join(figures) + "</div>"


def report_html(result: dict, samples: list[TestSample], scores: np.ndarray, files: list[str],
                curve_files: dict[str, str], threshold_source: str, evidence: dict | None = None) -> str:
    """The page: metrics, per-defect AUROC, curves, the worst false positives and negatives (each
    with its evidence when the model records it), all images."""
    esc = html.escape
    evidence = evidence or {}
    good = [i for i, s in enumerate(samples) if s.label == 0]
    defective = [i for i, s in enumerate(samples) if s.label == 1]
    worst_fp = sorted(good, key=lambda i: -scores[i])[:WORST_SHOWN]
    worst_fn = sorted(defective, key=lambda i: scores[i])[:WORST_SHOWN]
    threshold = result.get("image_f1_threshold")
    all_rows = "".join(
        f"<tr><td>{esc(s.defect_type)}</td><td><a href='{esc(files[i])}'>{esc(Path(s.path).name)}</a></td>"
        f"<td class='num'>{scores[i]:.4f}</td>"
        f"<td>{'' if threshold is None else ('anomalous' if scores[i] >= threshold else 'good')}</td></tr>"
        for i, s in sorted(enumerate(samples), key=lambda item: -scores[item[0]])
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>PatchCore evaluation - {esc(result['category'])}</title>
<style>{_css()}</style></head><body>
<h1>PatchCore evaluation: {esc(result['category'])}</h1>
<p class="sub">{esc(str(result['backbone']))}, coreset ratio {result['coreset_ratio']}, memory bank {result['memory_bank_size']} patches;
pixel metrics at {esc(str(result['pixel_eval_size'] or 'n/a'))} resolution</p>
<h2>Metrics</h2>
{_metrics_table(result)}
{_defect_section(result)}
<h2>Curves</h2>
<div class="curves"><img src="{esc(curve_files['roc'])}" alt="ROC curve"><img src="{esc(curve_files['pro'])}" alt="PRO curve"></div>
<h2>Overlays</h2>
<p class="legend">Each image: original | heat map | prediction.
<span style="background:rgb{PREDICTED_COLOUR}"></span>predicted region ({esc(threshold_source)}, {result['overlay_threshold']:.4f})
<span style="background:rgb{GROUND_TRUTH_COLOUR}"></span>ground truth</p>
<h2>Worst false positives (highest-scoring good images)</h2>
{_gallery(worst_fp, samples, scores, files, "no good test images", evidence)}
<h2>Worst false negatives (lowest-scoring defective images)</h2>
{_gallery(worst_fn, samples, scores, files, "no defective test images", evidence)}
<details><summary>All {len(samples)} test images by score (decision at the image F1-max threshold)</summary>
<table><tr><th>type</th><th>image</th><th>score</th><th>decision</th></tr>{all_rows}</table></details>
</body></html>
"""
