"""Fit time, peak memory and per-photo latency of model settings on real data, side by side.

    python benchmarks/bench_defaults.py                      # today's default vs the paper's protocol
    python benchmarks/bench_defaults.py --configs default,paper --data bottle,macaroni1 --photos 40

For each configuration and data set, in a fresh process (so that peak RSS is its own): fit on the
good training images (wall time and peak RSS), then score test photos one at a time from their
files, as a line would (decoding, network, search and map over the whole photo all included),
and the same for 1500x1000 JPEG photos (macaroni1's photos at their original resolution, made by
upscaling the 750x500 copies). Prints a table; ``--json`` prints the rows instead.

Needs ../shared/data (MVTec bottle, VisA macaroni1). Configurations: ``default`` (PatchCore()),
``paper`` (the paper's protocol: shorter side 256, centre crop 224, 10% bank) or a JSON object
of PatchCore settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = {"bottle": SHARED / "mvtec" / "bottle", "macaroni1": SHARED / "visa" / "macaroni1"}


def settings_of(config: str) -> dict:
    from patchcore import PRESETS

    if config == "default":
        return {}
    if config in PRESETS:
        return dict(PRESETS[config])
    return json.loads(config)


def large_photos(source: Path, count: int, folder: Path) -> list[Path]:
    """``count`` macaroni1 test photos upscaled to 1500x1000 JPEG (quality 90), as the originals were."""
    from PIL import Image

    paths = []
    for path in sorted((source / "test").glob("*/*.jpg"))[:count]:
        target = folder / f"{path.parent.name}_{path.stem}.jpg"
        with Image.open(path) as image:
            image.convert("RGB").resize((1500, 1000), Image.BICUBIC).save(target, quality=90)
        paths.append(target)
    return paths


def run_one(config: str, data: str, photos: int) -> dict:
    from patchcore import PatchCore

    root = DATA[data]
    train = sorted(p for p in (root / "train" / "good").iterdir() if p.suffix.lower() in (".png", ".jpg"))
    test = sorted(p for p in (root / "test").glob("*/*") if p.suffix.lower() in (".png", ".jpg"))
    test = test[:: max(1, len(test) // photos)][:photos]
    model = PatchCore(**settings_of(config))
    started = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - started
    peak_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.batch_size = 1

    def latency(paths) -> tuple[float, dict]:
        model.predict(paths[:1])  # warm-up
        stages = {"backbone": 0.0, "search": 0.0, "map": 0.0}
        started = time.perf_counter()
        for path in paths:  # one photo at a time, from its file
            prediction = model.predict([path])[0]
            for key in stages:
                stages[key] += prediction.timings.get(key, 0.0)
        total = 1000 * (time.perf_counter() - started) / len(paths)
        return total, {key: 1000 * value / len(paths) for key, value in stages.items()}

    ms, split = latency(test)
    row = {"config": config, "data": data, "settings": settings_of(config), "train_images": len(train),
           "patches": model.n_training_patches_, "bank": int(model.memory_bank_.shape[0]),
           "fit_seconds": fit_seconds, "fit_timings": model.fit_timings_, "peak_rss_fit_mib": peak_fit,
           "ms_per_photo": ms, "ms_split": split}
    row["photo_size"] = photo_size(test[0])
    if data == "macaroni1":
        with tempfile.TemporaryDirectory() as folder:
            big = large_photos(root, photos, Path(folder))
            row["ms_per_1500x1000"], row["ms_split_1500x1000"] = latency(big)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def photo_size(path: Path) -> list[int]:
    from PIL import Image

    with Image.open(path) as image:
        return list(image.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="default,paper", help="comma-separated: default, paper (or JSON settings, alone)")
    parser.add_argument("--data", default="bottle,macaroni1")
    parser.add_argument("--photos", type=int, default=40, help="test photos timed per data set")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.photos)))
        return
    configs = [args.configs] if args.configs.lstrip().startswith("{") else args.configs.split(",")
    rows = []
    for data in args.data.split(","):
        for config in configs:
            result = subprocess.run([sys.executable, __file__, "--one", config, data, "--photos", str(args.photos)],
                                    env=os.environ.copy(), capture_output=True, text=True)
            if result.returncode != 0:
                print(f"{config} on {data}: failed\n{result.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            if not args.json:
                r = rows[-1]
                big = f", 1500x1000 photo {r['ms_per_1500x1000']:.0f} ms" if "ms_per_1500x1000" in r else ""
                split = " / ".join(f"{v:.0f}" for v in r["ms_split"].values())
                print(f"{data:10s} {config:8s} fit {r['fit_seconds']:6.1f} s ({r['patches']} patches -> bank {r['bank']}), "
                      f"peak RSS {r['peak_rss_fit_mib']:.0f} MiB; {r['photo_size'][0]}x{r['photo_size'][1]} photo "
                      f"{r['ms_per_photo']:.0f} ms (backbone / search / map {split}){big}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
