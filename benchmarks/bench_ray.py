"""Scoring on Ray vs the plain ``predict``, side by side on this machine (prints figures; not a test).

    python benchmarks/bench_ray.py                 # MVTec bottle test photos, repeated to --images
    python benchmarks/bench_ray.py --images 400

Fits one model (the defaults) on MVTec bottle's good training images and saves it, then scores the
same photos (file paths; decoding, network, search, no overlays) three ways, each in a fresh
process: the plain in-process ``predict`` on every core, and ``predict_on_ray`` on a local Ray
with 1 and with 2 actors of one core each. Prints images/s, the speed-up over one actor, and
the overhead per image against the plain path (Ray start, model loading per actor, scheduling).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"


def photos(count: int, folder: Path) -> list[Path]:
    """``count`` distinct files (links to bottle's test photos, repeated), so that every one is scored."""
    sources = sorted((BOTTLE / "test").glob("*/*.png"))
    paths = []
    for index in range(count):
        target = folder / f"{index:05d}.png"
        os.symlink(sources[index % len(sources)], target)
        paths.append(target)
    return paths


def plain(model_dir: str, folder: str) -> dict:
    from patchcore import load_model
    from patchcore.engine.images import list_images

    started = time.perf_counter()
    model = load_model(model_dir)
    paths = list_images(folder)
    load = time.perf_counter() - started
    scores = [p.score for p in model.predict(paths, maps=False)]
    return {"seconds": time.perf_counter() - started, "load_seconds": load, "images": len(scores)}


def on_ray(model_dir: str, folder: str, workers: int) -> dict:
    from patchcore.fleet.scoring import predict_on_ray

    out = tempfile.mkdtemp()
    try:
        started = time.perf_counter()
        summary = predict_on_ray(model_dir, [folder], out, workers=workers, cpus_per_worker=1, progress=False)
        summary["seconds_with_start"] = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return summary


def run(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, model_dir, folder = args.one
        print(json.dumps(plain(model_dir, folder) if kind == "plain" else on_ray(model_dir, folder, int(kind))))
        return
    if not BOTTLE.is_dir():
        sys.exit(f"needs MVTec bottle at {BOTTLE}")
    from patchcore import PatchCore

    with tempfile.TemporaryDirectory() as work:
        model_dir, folder = Path(work) / "model", Path(work) / "photos"
        folder.mkdir()
        PatchCore().fit(sorted((BOTTLE / "train" / "good").glob("*.png"))).save(model_dir)
        photos(args.images, folder)
        rows = {"plain": run(["--one", "plain", str(model_dir), str(folder)])}
        for workers in (1, 2):
            rows[f"ray x{workers}"] = run(["--one", str(workers), str(model_dir), str(folder)])
    base = rows["plain"]["seconds"]
    one = rows["ray x1"]["seconds_with_start"]
    for name, row in rows.items():
        seconds = row.get("seconds_with_start", row["seconds"])
        extra = "" if name == "plain" else (f", x{one / seconds:.2f} of one actor, overhead "
                                            f"{1000 * (seconds - base) / args.images:+.1f} ms per image vs plain "
                                            f"(of which scoring {row['seconds']:.1f} s after Ray started)")
        print(f"{name:8s} {args.images} images in {seconds:6.1f} s: {args.images / seconds:5.1f} images/s{extra}")


if __name__ == "__main__":
    main()
