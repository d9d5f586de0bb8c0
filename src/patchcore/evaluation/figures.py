"""The curves of an evaluation: ROC (image and pixel) and PRO, as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: FPR limit of the AUPRO (as in the MVTec AD paper).
AUPRO_FPR_LIMIT = 0.3


def pyplot():
    """matplotlib's pyplot on the file-only Agg back end (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(folder: Path, result: dict, curves: dict) -> dict[str, str]:
    """``roc.png`` and ``pro.png`` in ``folder``; returns their names by kind."""
    plt = pyplot()
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
    return {"roc": "roc.png", "pro": "pro.png"}
