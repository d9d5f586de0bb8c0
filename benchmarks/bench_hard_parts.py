"""Orientation, image-score aggregation, test-time turns and input size on real data (issue 18).

    python benchmarks/rotated_dev_data.py ../shared/data/mvtec/bottle /tmp/rotated/bottle_rot90 --kind rot90   # etc.
    python benchmarks/bench_hard_parts.py --data bottle --config '{"augment": "rot90"}' \\
        --rotated /tmp/rotated --out results.jsonl [--tta rot90] [--timing 30]
    python benchmarks/bench_hard_parts.py --table results.jsonl

One fit per run (data set x settings), then every test set of ``--variants``: ``original`` (the
category's own test photos) and the turned copies made by ``rotated_dev_data.py``
(``<rotated>/<data>_rot90``, ``<rotated>/<data>_angle``). For each test set, from one pass of the
model's own scoring (:meth:`Detector.score_images`, maps by :func:`anomaly_map`, pixel metrics
over every pixel of the full-size photos as ``patchcore evaluate`` computes them):

- image AUROC of every aggregation of the patch scores (``--aggregations``: each with and
  without eq. 7's re-weighting, and ``map_max``, the largest value of the smoothed map at network
  resolution); the model's own setting is one of them, so its row equals ``patchcore evaluate``'s;
- pixel AUROC and AUPRO (they do not depend on the aggregation);
- with ``--tta rot90|dihedral``: each test photo's turned copies scored too, the image score the
  maximum, mean or minimum over the copies, the maps turned back and combined alike (the minimum
  takes the map of the copy with the lowest score), and the cost per photo.

``--timing N``: N test photos scored one per call from their files (decoding, network, search,
full-size map), after one warm-up, as ``bench_defaults.py``; for macaroni1 also N of its photos
upscaled to 1500x1000 JPEG. The load average is recorded with every timing: compare timings only
as ratios against a baseline run in the same session.

Writes one JSON line per run to ``--out``; a run already there (same data and settings) is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = {"bottle": (SHARED / "mvtec", "bottle"), "macaroni1": (SHARED / "visa", "macaroni1")}
AGGREGATIONS = "max,top3,top5,top10,top1%"
TTA_VIEWS = {"rot90": [(False, k) for k in range(4)], "dihedral": [(f, k) for f in (False, True) for k in range(4)]}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def dataset(data: str, variant: str, rotated: Path):
    from patchcore.evaluation.datasets import load_mvtec_category

    root, category = DATA[data]
    if variant == "original":
        return load_mvtec_category(root, category)
    return load_mvtec_category(rotated, f"{data}_{variant}")


def metrics_of(labels, scores: dict[str, list[float]]) -> dict[str, float]:
    from patchcore.evaluation import metrics

    return {name: 100.0 * metrics.image_auroc(labels, np.asarray(values)) for name, values in scores.items()}


def pixel_summary(pixels) -> dict[str, float]:
    from patchcore.evaluation import metrics
    from patchcore.evaluation.figures import AUPRO_FPR_LIMIT

    result = pixels.pixel_metrics()
    fpr, pro = pixels.pro_curve()
    return {"pixel_auroc": 100.0 * result["auroc"], "aupro": 100.0 * metrics.area_under_pro(fpr, pro, AUPRO_FPR_LIMIT)}


def score_test_set(model, samples, aggregations: list[str]) -> dict:
    """Image AUROC of every aggregation, pixel AUROC and AUPRO, from one pass of the model's scoring."""
    from patchcore.engine.detector import embed_batches, photo_grid
    from patchcore.engine.scoring import aggregated_image_score, anomaly_map, network_map
    from patchcore.evaluation import metrics
    from patchcore.evaluation.datasets import load_mask

    settings = model.settings()
    exact = model._exact_index()
    labels = np.array([s.label for s in samples])
    scores: dict[str, list[float]] = {}
    pixels = metrics.PixelScores(len(samples))
    position = 0
    started = time.perf_counter()
    for batch, features in embed_batches([s.path for s in samples], model.transform_, model.embedding_, 4):
        grids = [photo_grid(features[i], p) for i, p in enumerate(batch.placements)]
        patches = [g.reshape(-1, g.shape[-1]) for g in grids]
        scored = model.score_images(patches)
        for (distances, nearest, own), grid, flat, placement in zip(scored, grids, patches, batch.placements):
            sample = samples[position]
            position += 1
            scores.setdefault("model", []).append(own)
            for name in aggregations:
                for reweight in (True, False):
                    key = name + ("" if reweight else " plain")
                    scores.setdefault(key, []).append(aggregated_image_score(
                        distances, nearest, flat, exact, name, reweight, settings.num_neighbours))
            grid_scores = distances.reshape(grid.shape[:2])
            scores.setdefault("map_max", []).append(float(network_map(grid_scores, placement, settings.smoothing_sigma).max()))
            amap = anomaly_map(grid_scores, placement, settings.smoothing_sigma)
            pixels.add(load_mask(sample, amap.shape), amap)
    seconds = time.perf_counter() - started
    return {"image_auroc": metrics_of(labels, scores), **pixel_summary(pixels),
            "ms_per_photo_batched": 1000.0 * seconds / len(samples), "n": len(samples)}


def turned(image, flip: bool, turns: int):
    from PIL import Image

    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image.transpose((None, Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)[turns]) if turns else image


def turned_back(amap: np.ndarray, flip: bool, turns: int) -> np.ndarray:
    back = np.rot90(amap, -turns)
    return np.ascontiguousarray(back[:, ::-1] if flip else back)


def tta_test_set(model, samples, views: list[tuple[bool, int]]) -> dict:
    """Test-time turns: every copy of each test photo scored; image scores and maps combined."""
    from patchcore.engine.images import read_image
    from patchcore.evaluation import metrics
    from patchcore.evaluation.datasets import load_mask

    labels = np.array([s.label for s in samples])
    combined = {"max": metrics.PixelScores(len(samples)), "mean": metrics.PixelScores(len(samples)),
                "min": metrics.PixelScores(len(samples))}
    scores: dict[str, list[float]] = {name: [] for name in combined}
    started = time.perf_counter()
    for sample in samples:
        photo = read_image(sample.path)
        copies = [turned(photo, flip, turns) for flip, turns in views]
        predictions = model.predict(copies, maps=True)
        maps = np.stack([turned_back(p.anomaly_map, flip, turns) for p, (flip, turns) in zip(predictions, views)])
        values = np.array([p.score for p in predictions])
        mask = load_mask(sample, maps.shape[1:])
        scores["max"].append(float(values.max()))
        scores["mean"].append(float(values.mean()))
        scores["min"].append(float(values.min()))
        combined["max"].add(mask, maps.max(axis=0))
        combined["mean"].add(mask, maps.mean(axis=0))
        combined["min"].add(mask, maps[int(values.argmin())])
    seconds = time.perf_counter() - started
    aurocs = metrics_of(labels, scores)
    return {name: {"image_auroc": aurocs[name], **pixel_summary(combined[name])} for name in combined} | {
        "ms_per_photo_batched": 1000.0 * seconds / len(samples), "copies": len(views)}


def large_photos(data: str, count: int, folder: Path) -> list[Path]:
    """``count`` macaroni1 test photos upscaled to 1500x1000 JPEG (quality 90), as bench_defaults.py."""
    from PIL import Image

    root, category = DATA[data]
    paths = []
    for path in sorted((root / category / "test").glob("*/*.jpg"))[:count]:
        target = folder / f"{path.parent.name}_{path.stem}.jpg"
        with Image.open(path) as image:
            image.convert("RGB").resize((1500, 1000), Image.BICUBIC).save(target, quality=90)
        paths.append(target)
    return paths


def latency(model, paths: list[Path]) -> dict:
    """ms per photo, one photo per call from its file (maps included), after one warm-up."""
    model.predict(paths[:1])
    stages = {"backbone": 0.0, "search": 0.0, "map": 0.0}
    before = load()
    started = time.perf_counter()
    for path in paths:
        prediction = model.predict([path])[0]
        for key in stages:
            stages[key] += prediction.timings.get(key, 0.0)
    total = 1000.0 * (time.perf_counter() - started) / len(paths)
    return {"ms": total, "split": {k: 1000.0 * v / len(paths) for k, v in stages.items()}, "load_before": before,
            "load_after": load()}


def run(args) -> dict:
    from patchcore import PatchCore

    settings = json.loads(args.config)
    model = PatchCore(**settings)
    train = dataset(args.data, "original", args.rotated).train
    row = {"data": args.data, "settings": settings, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_fit_before": load()}
    started = time.perf_counter()
    model.fit(train)
    row.update({"fit_seconds": time.perf_counter() - started, "load_fit_after": load(), "fit_timings": model.fit_timings_,
                "patches": int(model.n_training_patches_), "bank": int(model.memory_bank_.shape[0]),
                "peak_rss_fit_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    print(f"{args.data} {settings}: fit {row['fit_seconds']:.0f} s, bank {row['bank']}", file=sys.stderr, flush=True)
    aggregations = [a for a in args.aggregations.split(",") if a]
    row["variants"] = {}
    for variant in [v for v in args.variants.split(",") if v]:
        samples = dataset(args.data, variant, args.rotated).test
        result = score_test_set(model, samples, aggregations)
        result["load"] = load()
        if args.tta:
            result["tta"] = tta_test_set(model, samples, TTA_VIEWS[args.tta])
        row["variants"][variant] = result
        print(f"  {variant}: image AUROC {result['image_auroc']['model']:.2f}, pixel {result['pixel_auroc']:.2f}, "
              f"AUPRO {result['aupro']:.2f}", file=sys.stderr, flush=True)
    if args.timing:
        model.batch_size = 1
        test = sorted(s.path for s in dataset(args.data, "original", args.rotated).test)
        test = test[:: max(1, len(test) // args.timing)][: args.timing]
        row["timing"] = {"photo": latency(model, test)}
        if args.data == "macaroni1":
            with tempfile.TemporaryDirectory() as folder:
                row["timing"]["1500x1000"] = latency(model, large_photos(args.data, args.timing, Path(folder)))
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def done(out: Path, data: str, settings: dict) -> bool:
    if not out.is_file():
        return False
    for line in out.read_text().splitlines():
        row = json.loads(line)
        if row["data"] == data and row["settings"] == settings:
            return True
    return False


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("| data | settings | fit s | bank | test set | image AUROC | pixel AUROC | AUPRO | ms/photo (1500x1000) |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        timing = row.get("timing", {})
        ms = f"{timing['photo']['ms']:.0f}" if "photo" in timing else ""
        if "1500x1000" in timing:
            ms += f" ({timing['1500x1000']['ms']:.0f})"
        for variant, result in row["variants"].items():
            print(f"| {row['data']} | {json.dumps(row['settings'])} | {row['fit_seconds']:.0f} | {row['bank']} | {variant} | "
                  f"{result['image_auroc']['model']:.2f} | {result['pixel_auroc']:.2f} | {result['aupro']:.2f} | {ms} |")
    print()
    names = sorted({name for row in rows for r in row["variants"].values() for name in r["image_auroc"]})
    print("| data | settings | test set | " + " | ".join(names) + " |")
    print("| --- | --- | --- | " + " | ".join("---:" for _ in names) + " |")
    for row in rows:
        for variant, result in row["variants"].items():
            print(f"| {row['data']} | {json.dumps(row['settings'])} | {variant} | "
                  + " | ".join(f"{result['image_auroc'].get(n, float('nan')):.2f}" for n in names) + " |")
    tta = [(row, v, r["tta"]) for row in rows for v, r in row["variants"].items() if "tta" in r]
    if tta:
        print()
        print("| data | settings | test set | copies | combine | image AUROC | pixel AUROC | AUPRO | ms/photo (batched) |")
        print("| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for row, variant, result in tta:
            for combine in ("max", "mean", "min"):
                r = result[combine]
                print(f"| {row['data']} | {json.dumps(row['settings'])} | {variant} | {result['copies']} | {combine} | "
                      f"{r['image_auroc']:.2f} | {r['pixel_auroc']:.2f} | {r['aupro']:.2f} | {result['ms_per_photo_batched']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA))
    parser.add_argument("--config", default="{}", help="PatchCore settings as a JSON object (default: the defaults)")
    parser.add_argument("--variants", default="original,rot90,angle")
    parser.add_argument("--rotated", type=Path, default=Path("/tmp/rotated"), help="where rotated_dev_data.py wrote")
    parser.add_argument("--aggregations", default=AGGREGATIONS)
    parser.add_argument("--tta", choices=sorted(TTA_VIEWS), default=None)
    parser.add_argument("--timing", type=int, default=0, help="test photos timed one per call (0: none)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, help="print the tables of a results file and stop")
    args = parser.parse_args()
    if args.table:
        table(args.table)
        return
    if args.out and done(args.out, args.data, json.loads(args.config)):
        print(f"{args.data} {args.config}: already in {args.out}", file=sys.stderr)
        return
    row = run(args)
    line = json.dumps(row)
    if args.out:
        with open(args.out, "a") as out:
            out.write(line + "\n")
    else:
        print(line)


if __name__ == "__main__":
    main()
