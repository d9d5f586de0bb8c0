"""Does the synthetic ranking of ``patchcore tune`` agree with real defects? (issue 18)

For each data set (an MVTec-style category folder: train/good, test/<defect>, ground_truth):

1. synthetic: ``tune`` on ``train/good`` only (its defaults: 20% held out, at most 40, three
   synthetic defects on copies of each, candidates fitted on at most 200 photos), every candidate
   of the grid measured, no limits;
2. real: each candidate fitted on all of ``train/good`` and evaluated on the labelled test set
   with ``evaluate_dataset`` (image AUROC, AUPRO; pixel metrics on maps and masks resized to
   ``--eval-size``);

then prints both rankings, the Spearman rank correlation of the synthetic ranking score (mean of
image AUROC and AUPRO) with the same score on real defects (and of each metric with its real
counterpart), the pairs of candidates the two rankings order differently, and what choosing by
the synthetic score would have cost on the real test set.

    python benchmarks/tune_agreement.py ../shared/data/mvtec/bottle ../shared/data/visa/macaroni1 -o out/tune_agreement

Each measured cell is appended to ``OUT/cells.jsonl`` and skipped when the script runs again, so
an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

from scipy.stats import spearmanr

from patchcore.engine.model import PatchCore
from patchcore.evaluation.datasets import load_mvtec_category
from patchcore.evaluation.evaluate import evaluate_dataset
from patchcore.evaluation.tuning import (DEFAULT_DEFECTS_PER_PHOTO, describe, measure, prepare_holdout, ranking_score,
                                         unknown_settings)

#: The candidates compared: input size, backbone and bank share around the defaults.
GRID = (
    {"backbone": "efficientnet_lite2", "resize": 256},
    {"backbone": "efficientnet_lite0", "resize": 320},
    {"backbone": "efficientnet_lite2", "resize": 320},
    {"backbone": "efficientnet_lite0", "resize": 384},
    {"backbone": "efficientnet_lite1", "resize": 384},
    {"backbone": "efficientnet_lite2", "resize": 384},
    {"backbone": "efficientnet_lite2", "resize": 384, "coreset_ratio": 0.025},
    {"backbone": "efficientnet_lite2", "resize": 448},
    # Settings that tune's own list also tries (left out where this patchcore lacks them):
    {"backbone": "efficientnet_lite2", "resize": 384, "aggregation": "top1%"},
    {"backbone": "efficientnet_lite2", "resize": 384, "augment": "flip"},
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", flush=True)


def cell_key(dataset: str, kind: str, settings: dict) -> str:
    return json.dumps([dataset, kind, sorted(settings.items())])


def read_cells(path: Path) -> dict[str, dict]:
    cells = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                cells[row["key"]] = row
    return cells


def run_dataset(folder: Path, out: Path, cells: dict[str, dict], eval_size: int, seed: int, per_photo: int) -> list[dict]:
    name = folder.resolve().name
    dataset = load_mvtec_category(folder.resolve().parent, name)
    log_path = out / "cells.jsonl"
    held = None
    rows = []
    for settings in GRID:
        if unknown_settings(settings):
            continue
        row = {"settings": settings}
        for kind in ("synthetic", "real"):
            key = cell_key(name, kind if kind == "real" or per_photo == 1 else f"{kind} x{per_photo}", settings)
            if key not in cells:
                log(f"{name}: {kind} {describe(settings)}")
                started = time.perf_counter()
                if kind == "synthetic":
                    if held is None:
                        held = prepare_holdout(dataset.train, out / name / f"defects_x{per_photo}", seed=seed,
                                               defects_per_photo=per_photo)
                    trial = measure(settings, held, lambda s: PatchCore(**s))
                    value = {"image_auroc": trial.image_auroc, "aupro": trial.aupro, "fit_seconds": trial.fit_seconds,
                             "predict_ms": trial.predict_ms, "train": len(held.train), "held_out": len(held.good),
                             "defective": len(held.defective)}
                else:
                    result = evaluate_dataset(PatchCore(**settings), dataset, None, eval_size=eval_size)
                    value = {k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro", "fit_seconds", "ms_per_image")}
                value.update(seconds=time.perf_counter() - started, load=os.getloadavg()[0])
                cells[key] = {"key": key, "dataset": name, "kind": kind, "settings": settings, **value}
                with open(log_path, "a") as file:
                    file.write(json.dumps(cells[key]) + "\n")
                log(f"{name}: {kind} {describe(settings)}: image AUROC {100 * value['image_auroc']:.1f}, "
                    f"AUPRO {100 * value['aupro']:.1f} ({value['seconds']:.0f} s)")
            row[kind] = cells[key]
        rows.append(row)
    return rows


def ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    result = [0] * len(values)
    for rank, i in enumerate(order, 1):
        result[i] = rank
    return result


def rank_correlation(a: list[float], b: list[float]) -> str:
    """Spearman's rho as text; ``n/a`` where one side ranks nothing (all values equal)."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return "n/a (all equal)"
    return f"{spearmanr(a, b).statistic:+.2f}"


def report(name: str, rows: list[dict]) -> str:
    synthetic = [ranking_score(r["synthetic"]["image_auroc"], r["synthetic"]["aupro"]) for r in rows]
    real = [ranking_score(r["real"]["image_auroc"], r["real"]["aupro"]) for r in rows]
    s_rank, r_rank = ranks(synthetic), ranks(real)
    defective = rows[0]["synthetic"].get("defective", rows[0]["synthetic"]["held_out"])
    lines = [f"### {name} ({rows[0]['synthetic']['held_out']} held-out good photos, {defective} with a synthetic defect)", "",
             "| candidate | synthetic image AUROC | synthetic AUPRO | synthetic score | rank | real image AUROC | real AUPRO "
             "| real score | rank | tune fit s | ms/photo |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(rows):
        s, r = row["synthetic"], row["real"]
        lines.append(f"| {describe(row['settings'])} | {100 * s['image_auroc']:.1f} | {100 * s['aupro']:.1f} | "
                     f"{100 * synthetic[i]:.1f} | {s_rank[i]} | {100 * r['image_auroc']:.1f} | {100 * r['aupro']:.1f} | "
                     f"{100 * real[i]:.1f} | {r_rank[i]} | {s['fit_seconds']:.0f} | {s['predict_ms']:.0f} |")
    rho = rank_correlation(synthetic, real)
    rho_image = rank_correlation([r["synthetic"]["image_auroc"] for r in rows], [r["real"]["image_auroc"] for r in rows])
    rho_aupro = rank_correlation([r["synthetic"]["aupro"] for r in rows], [r["real"]["aupro"] for r in rows])
    pick = max(range(len(rows)), key=lambda i: synthetic[i])
    best = max(range(len(rows)), key=lambda i: real[i])
    lines += ["", f"Spearman rank correlation over {len(rows)} candidates: score {rho}, image AUROC {rho_image}, "
              f"AUPRO {rho_aupro}.",
              f"Synthetic pick: {describe(rows[pick]['settings'])} (real score {100 * real[pick]:.1f}); real best: "
              f"{describe(rows[best]['settings'])} ({100 * real[best]:.1f}); cost of choosing by the synthetic score: "
              f"{100 * (real[best] - real[pick]):.1f} points."]
    discordant = [(i, j) for i, j in itertools.combinations(range(len(rows)), 2)
                  if (synthetic[i] - synthetic[j]) * (real[i] - real[j]) < 0]
    discordant.sort(key=lambda p: -abs(real[p[0]] - real[p[1]]))
    lines.append(f"Pairs ordered differently: {len(discordant)} of {len(rows) * (len(rows) - 1) // 2}; the largest real gaps:")
    for i, j in discordant[:5]:
        lines.append(f"- {describe(rows[i]['settings'])} vs {describe(rows[j]['settings'])}: synthetic "
                     f"{100 * synthetic[i]:.1f} vs {100 * synthetic[j]:.1f}, real {100 * real[i]:.1f} vs {100 * real[j]:.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="MVTec-style category folders")
    parser.add_argument("-o", "--output", type=Path, default=Path("out/tune_agreement"))
    parser.add_argument("--eval-size", type=int, default=256, help="pixel metrics on N x N maps and masks (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the synthetic defects")
    parser.add_argument("--defects-per-photo", type=int, default=DEFAULT_DEFECTS_PER_PHOTO,
                        help=f"synthetic defects drawn on each held-out photo, each on its own copy "
                             f"(default: {DEFAULT_DEFECTS_PER_PHOTO}, as tune)")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    cells = read_cells(args.output / "cells.jsonl")
    reports = []
    for folder in args.folders:  # each data set's tables as soon as it is done
        reports.append(report(folder.resolve().name, run_dataset(folder, args.output, cells, args.eval_size, args.seed,
                                                                  args.defects_per_photo)))
        print(reports[-1], flush=True)
        (args.output / f"agreement_x{args.defects_per_photo}.md").write_text("\n\n".join(reports) + "\n")


if __name__ == "__main__":
    main()
