"""Core engine benchmark: fit and inference timings and peak memory (prints figures; not a test).

    python benchmarks/bench_core.py [--backbones efficientnet_lite0,wide_resnet50_2]

200 training and 100 test images at the default input (whole photo, shorter side 384): MVTec AD
bottle from ../shared when present, otherwise generated 224 px arrays. wide_resnet50_2 runs with random weights (timing does not depend
on weight values). Each configuration runs in a fresh process so that peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED_BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _images(n_train: int, n_test: int):
    if SHARED_BOTTLE.is_dir():
        train = sorted((SHARED_BOTTLE / "train" / "good").glob("*.png"))
        test = sorted((SHARED_BOTTLE / "test").glob("*/*.png"))
        train = (train * (n_train // len(train) + 1))[:n_train]
        test = (test * (n_test // len(test) + 1))[:n_test]
        return "MVTec bottle (900 px PNG)", train, test
    rng = np.random.default_rng(0)
    images = [(rng.random((224, 224, 3)) * 255).astype(np.uint8) for _ in range(n_train + n_test)]
    return "generated 224 px arrays", images[:n_train], images[n_train:]


def run_one(backbone: str, ratio: float, n_train: int, n_test: int, search: str = "auto") -> dict:
    """Fit once (timing each stage, peak RSS), then time inference at batch 1."""
    import torch

    from patchcore import PatchCore
    from patchcore.engine.images import read_image

    source, train, test = _images(n_train, n_test)
    weights = "imagenet" if backbone.startswith("efficientnet_lite") else "random"
    rss_start = _rss_mib()
    model = PatchCore(backbone=backbone, weights=weights, coreset_ratio=ratio, batch_size=8, search_backend=search).fit(train)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    matrix_mib = model.n_training_patches_ * model.memory_bank_.shape[1] * 4 / 2**20
    decoded = [read_image(p, i) for i, p in enumerate(test)]  # decode once: time the model, not PNG decoding
    model.batch_size = 1
    model.predict(decoded[:2])  # warm-up
    totals = {"backbone": 0.0, "search": 0.0, "map": 0.0}
    started = time.perf_counter()
    for prediction in model.iter_predict(decoded):
        for key in totals:
            totals[key] += prediction.timings[key]
    wall_ms = 1000 * (time.perf_counter() - started) / len(decoded)
    split = {k: 1000 * v / len(decoded) for k, v in totals.items()}
    return {
        "backbone": backbone, "ratio": ratio, "search": search, "data": source, "threads": torch.get_num_threads(),
        "train_images": n_train, "feature_matrix": [model.n_training_patches_, model.memory_bank_.shape[1]],
        "feature_matrix_mib": matrix_mib, "bank_size": model.memory_bank_.shape[0],
        "fit_seconds": model.fit_timings_, "ms_per_image": wall_ms, "ms_split": split,
        "search_and_map_share": (split["search"] + split["map"]) / wall_ms,
        "rss_start_mib": rss_start, "peak_rss_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet_lite0,wide_resnet50_2")
    parser.add_argument("--ratios", default="0.01,0.1")
    parser.add_argument("--search", default="auto", help="search backend(s), comma-separated: auto, numpy, faiss, hnsw, ivfpq")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.ratio, args.train, args.test, args.search)))
        return
    env = dict(os.environ)
    for backbone, ratio, search in [(b, float(r), s) for b in args.backbones.split(",")
                                    for r in args.ratios.split(",") for s in args.search.split(",")]:
            output = subprocess.run(
                [sys.executable, __file__, "--one", backbone, "--ratio", str(ratio), "--search", search,
                 "--train", str(args.train), "--test", str(args.test)],
                env=env, capture_output=True, text=True,
            )
            if output.returncode != 0:
                print(f"{backbone} at {ratio}: failed\n{output.stderr[-2000:]}")
                continue
            r = json.loads(output.stdout.strip().splitlines()[-1])
            fit = r["fit_seconds"]
            split = ", ".join(f"{k} {v:.1f}" for k, v in r["ms_split"].items())
            print(f"\n== {backbone}, coreset {ratio}, {search} search ({r['data']}, {r['threads']} threads) ==", flush=True)
            print(f"fit: features {fit['features']:.1f} s ({r['feature_matrix'][0]} x {r['feature_matrix'][1]}, "
                  f"{r['feature_matrix_mib']:.0f} MiB), coreset {fit['coreset']:.1f} s -> {r['bank_size']} vectors, "
                  f"index {1000 * fit['index']:.1f} ms")
            print(f"inference at batch 1: {r['ms_per_image']:.1f} ms/img ({split}); search+map {100 * r['search_and_map_share']:.0f}%")
            growth = (r["peak_rss_mib"] - r["rss_start_mib"]) / r["feature_matrix_mib"]
            print(f"peak RSS {r['peak_rss_mib']:.0f} MiB, {r['rss_start_mib']:.0f} MiB at start: fit grew it by "
                  f"{growth:.2f} x the feature matrix (includes the backbone and torch's buffers)")


if __name__ == "__main__":
    main()
