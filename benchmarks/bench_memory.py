"""Fitting large training sets: peak memory and time against the number of images (prints figures).

    python benchmarks/bench_memory.py                    # 1,000 / 2,000 / 4,000 generated images
    python benchmarks/bench_memory.py --sizes 500,1000 --coverage 60000

Each size runs in a fresh process (so that its peak RSS is its own) with the default settings
on generated 256x256 textures (PNG files written first). Prints fit seconds, peak RSS, the
bank size and the time ratio between consecutive sizes. ``--coverage N`` also compares, on N
generated patch vectors, the coverage radius (farthest any vector lies from the bank) of the
chunked coreset against the plain greedy one, and the image AUROC of a fit on float16 patches
on disk against one on float32 patches in memory, on synthetic defects.
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

import numpy as np


def texture(rng: np.random.Generator, size: int = 256, defect: bool = False) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    base = 0.5 + 0.25 * np.sin(x * 0.3 + phase[0]) * np.cos(y * 0.3 + phase[1])
    image = np.stack([base, base * 0.9 + 0.05, base * 0.7 + 0.1], axis=-1) + rng.normal(0, 0.03, (size, size, 3))
    if defect:
        row, col = rng.integers(20, size - 40, size=2)
        image[row : row + 12, col : col + 12] *= 0.8  # a small, darker spot: hard, not hopeless
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        if not path.exists():
            Image.fromarray(texture(rng)).save(path, compress_level=1)
        paths.append(path)
    return paths


def fit_one(folder: str, count: int) -> dict:
    from patchcore import PatchCore

    paths = sorted(Path(folder).glob("*.png"))[:count]
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    model = PatchCore().fit(paths)
    return {"images": count, "fit_seconds": time.perf_counter() - started, "timings": model.fit_timings_,
            "patches": model.n_training_patches_, "bank": int(model.memory_bank_.shape[0]),
            "rss_before_fit_mib": start_rss, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def coverage_and_auroc(n_vectors: int) -> None:
    from sklearn.metrics import roc_auc_score

    import patchcore.engine.model as model_module
    from patchcore import PatchCore
    from patchcore.engine.coreset import coverage_radius, coreset_size, select_coreset
    from patchcore.engine.patch_store import PatchStore

    class Float32Store(PatchStore):
        """The patch store keeping float32 rows, as fitting did before the store existed."""

        def __init__(self, width, directory=None, dtype=np.float32):
            super().__init__(width, directory, np.float32)

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((300, 64)).astype(np.float32) * 4
    vectors = centres[rng.integers(300, size=n_vectors)] + rng.standard_normal((n_vectors, 64)).astype(np.float32)
    k = coreset_size(n_vectors, 0.01)
    started = time.perf_counter()
    full = select_coreset(vectors, k, exact_limit=n_vectors)
    full_seconds = time.perf_counter() - started
    started = time.perf_counter()
    chunked = select_coreset(vectors, k, exact_limit=0)
    chunked_seconds = time.perf_counter() - started
    full_radius, chunked_radius = coverage_radius(vectors, full), coverage_radius(vectors, chunked)
    print(f"coverage radius on {n_vectors} vectors, 1% bank: plain greedy {full_radius:.3f} ({full_seconds:.1f} s), "
          f"chunked {chunked_radius:.3f} ({chunked_seconds:.1f} s): x{chunked_radius / full_radius:.3f}")

    bottle = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle" / "train" / "good"
    if bottle.is_dir():  # the same on real patches: MVTec bottle's training images at the defaults
        model = PatchCore()
        with model.extract_patches(sorted(bottle.glob("*.png"))) as store:
            k = coreset_size(len(store), model.coreset_ratio, model.max_bank_size)
            started = time.perf_counter()
            full = select_coreset(store, k, exact_limit=len(store))
            full_seconds = time.perf_counter() - started
            started = time.perf_counter()
            chunked = select_coreset(store, k, exact_limit=0)
            chunked_seconds = time.perf_counter() - started
            patches = store.read(0, len(store))
            n_patches = len(store)
        full_radius, chunked_radius = coverage_radius(patches, full), coverage_radius(patches, chunked)
        del patches
        print(f"coverage radius on MVTec bottle's {n_patches} real patches, 1% bank: plain greedy {full_radius:.3f} "
              f"({full_seconds:.1f} s), chunked {chunked_radius:.3f} ({chunked_seconds:.1f} s): x{chunked_radius / full_radius:.3f}")

    train = [texture(rng) for _ in range(40)]
    test = [texture(rng) for _ in range(50)] + [texture(rng, defect=True) for _ in range(50)]
    labels = [0] * 50 + [1] * 50
    aurocs: dict[str, list[float]] = {"float16 on disk": [], "float32 in memory": []}
    for seed in range(5):  # the coreset seed moves the AUROC too: compare means over seeds
        for kind, store in (("float16 on disk", PatchStore), ("float32 in memory", Float32Store)):
            model_module.PatchStore = store  # Float32Store: float32 patches, as before the store
            try:
                model = PatchCore(coreset_ratio=0.05, seed=seed).fit(train)
            finally:
                model_module.PatchStore = PatchStore
            aurocs[kind].append(roc_auc_score(labels, [p.score for p in model.predict(test, maps=False)]))
    means = {kind: float(np.mean(values)) for kind, values in aurocs.items()}
    print("image AUROC on synthetic defects, mean over coreset seeds 0-4: " + ", ".join(
        f"{kind} {mean:.4f} ({' '.join(f'{v:.4f}' for v in aurocs[kind])})" for kind, mean in means.items())
        + f"; difference {abs(means['float16 on disk'] - means['float32 in memory']):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,2000,4000")
    parser.add_argument("--coverage", type=int, default=60000, help="vectors for the coverage comparison (0: skip)")
    parser.add_argument("--folder", default=None, help="where the generated images go (default: a temporary folder)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(fit_one(args.one[0], int(args.one[1]))))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.folder or scratch) / "train"
        write_images(folder, max(sizes, default=0))
        previous = None
        for size in sizes:
            result = subprocess.run([sys.executable, __file__, "--one", str(folder), str(size)], capture_output=True,
                                    text=True, env=os.environ.copy())
            if result.returncode != 0:
                print(f"{size} images: failed\n{result.stderr[-2000:]}")
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            ratio = f", x{row['fit_seconds'] / previous['fit_seconds']:.2f} the time of {previous['images']}" if previous else ""
            stages = ", ".join(f"{k} {v:.0f} s" for k, v in row["timings"].items())
            print(f"{size:5d} images: fit {row['fit_seconds']:6.1f} s ({stages}){ratio}; {row['patches']} patches -> "
                  f"bank {row['bank']}; peak RSS {row['peak_rss_mib']:.0f} MiB ({row['rss_before_fit_mib']:.0f} before fitting)",
                  flush=True)
            previous = row
    if args.coverage:
        coverage_and_auroc(args.coverage)


if __name__ == "__main__":
    main()
