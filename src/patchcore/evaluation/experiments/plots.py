"""One figure per experiment, drawn from its result rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..figures import pyplot
from ..summary import percent
from .tables import shots_summary


def finished(rows: list[dict]) -> list[dict]:
    return [row for row in rows if "skipped" not in row]


def plot_coreset(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    for sampler, style in (("greedy", "o-"), ("random", "s--")):
        group = sorted((r for r in finished(rows) if r["cell"]["subsampling"] == sampler), key=lambda r: r["cell"]["ratio"])
        if not group:
            continue
        x = [100 * r["cell"]["ratio"] for r in group]
        axes[0].plot(x, [100 * r["image_auroc"] for r in group], style, label=f"{sampler} image AUROC")
        if group[0]["pixel_auroc"] is not None:
            axes[0].plot(x, [100 * r["pixel_auroc"] for r in group], style, alpha=0.5, label=f"{sampler} pixel AUROC")
        axes[1].plot(x, [r["ms_per_image"] for r in group], style, label=sampler)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("coreset ratio (%)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("AUROC (%)")
    axes[1].set_ylabel("ms per image")
    figure.suptitle("coreset: greedy vs random subsampling")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def bar_plot(title: str):
    """A plot function drawing image and pixel AUROC per cell as bars."""

    def plot(rows: list[dict], path: Path) -> None:
        plt = pyplot()
        ok = finished(rows)
        labels = [" ".join(f"{v}" for v in r["cell"].values()) for r in ok]
        figure, axes = plt.subplots(figsize=(max(5, 0.9 * len(ok) + 2), 4), dpi=100)
        x = np.arange(len(ok))
        axes.bar(x - 0.2, [100 * (r["image_auroc"] or 0) for r in ok], 0.4, label="image AUROC")
        axes.bar(x + 0.2, [100 * (r["pixel_auroc"] or 0) for r in ok], 0.4, label="pixel AUROC")
        axes.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        low = min([100 * (r["image_auroc"] or 0) for r in ok] + [100 * (r["pixel_auroc"] or 0) for r in ok] + [100])
        axes.set_ylim(max(0, low - 5), 100.5)
        axes.set_ylabel("AUROC (%)")
        axes.set_title(title)
        axes.legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)

    return plot


def plot_speed(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    ok = finished(rows)
    labels = [f"{100 * r['cell']['ratio']:g}% {r['cell']['index']}" for r in ok]
    figure, axes = plt.subplots(figsize=(max(5, 0.9 * len(ok) + 2), 4), dpi=100)
    bottom = np.zeros(len(ok))
    for key in ("backbone", "search", "map"):
        values = np.array([r.get(f"ms_{key}") or 0.0 for r in ok])
        axes.bar(labels, values, bottom=bottom, label=key)
        bottom += values
    for i, r in enumerate(ok):
        axes.text(i, bottom[i], percent(r["image_auroc"]), ha="center", va="bottom", fontsize=8)
    axes.set_ylabel("ms per image (label: image AUROC %)")
    axes.set_title("speed: per-image time split")
    axes.tick_params(axis="x", rotation=30, labelsize=8)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_shots(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    summary = shots_summary(rows)
    figure, axes = plt.subplots(figsize=(5, 3.8), dpi=100)
    x = [s["shots"] for s in summary]
    for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        if all(s[f"{key}_mean"] is not None for s in summary):
            axes.errorbar(x, [100 * s[f"{key}_mean"] for s in summary], yerr=[100 * s[f"{key}_std"] for s in summary],
                          marker="o", capsize=3, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("training images (shots)")
    axes.set_ylabel("AUROC (%), mean ± std over seeds")
    axes.set_title("few-shot")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
