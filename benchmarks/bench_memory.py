"""Fitting large training sets: peak memory and time against the number of images (prints figures).

    python benchmarks/bench_memory.py                    # 1,000 / 2,000 / 4,000 generated images
    python benchmarks/bench_memory.py --sizes 500,1000 --coverage 60000
    python benchmarks/bench_memory.py --commands [--before OLD/src]   # fit, evaluate, serve on bottle

``--commands`` measures the peak RSS (``/usr/bin/time -v``) and wall time of ``patchcore fit`` on
MVTec bottle's training images, ``patchcore evaluate`` on bottle and ``patchcore serve`` of the
saved model answering one request, each at the defaults in a fresh process: with an empty network
cache (torch builds the graph), with the cache warm, and with ``--before`` for the code of another
source tree (``git worktree add /tmp/before SHA``; ``--before /tmp/before/src``), interleaved.

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
import shutil
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
    from patchcore.engine.chunks import merge_chunks, reduce_store
    from patchcore.engine.coreset import Chunking, coverage_radius, coreset_size, select_coreset
    from patchcore.engine.model import REFERENCE_PATCHES
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
            rows_chunked = select_coreset(store, k, exact_limit=0)  # contiguous chunks of 50,000 rows (before issue 20)
            rows_seconds = time.perf_counter() - started
            started = time.perf_counter()  # the fit's: chunks of whole photos (about 50,000 patches)
            chunked = merge_chunks(reduce_store(store, model.coreset_settings(), Chunking(), REFERENCE_PATCHES),
                                   model.coreset_settings()).indices
            chunked_seconds = time.perf_counter() - started
            patches = store.read(0, len(store))
            n_patches = len(store)
        full_radius, chunked_radius = coverage_radius(patches, full), coverage_radius(patches, chunked)
        rows_radius = coverage_radius(patches, rows_chunked)
        del patches
        print(f"coverage radius on MVTec bottle's {n_patches} real patches, 1% bank: plain greedy {full_radius:.3f} "
              f"({full_seconds:.1f} s), chunked by photos (the fit's) {chunked_radius:.3f} ({chunked_seconds:.1f} s): "
              f"x{chunked_radius / full_radius:.3f}; chunked by rows {rows_radius:.3f} ({rows_seconds:.1f} s): "
              f"x{rows_radius / full_radius:.3f}")

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


def timed(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command`` under ``/usr/bin/time -v``: wall seconds, peak RSS in MiB, exit status."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    peak = next((int(line.split(":")[1]) for line in result.stderr.splitlines() if "Maximum resident set size" in line), 0)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
    return {"seconds": wall, "peak_mib": peak / 1024, "status": result.returncode}


def serve_once(model: Path, image: Path, env: dict[str, str],
               options: tuple[str, ...] = ("--no-teach-in", "--threads", "2")) -> dict:
    """``patchcore serve`` of ``model`` (with ``options``) under ``/usr/bin/time -v`` until it has
    answered one request: seconds from start to the answer, peak RSS in MiB, the score."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "patchcore.cli", "serve", str(model), "--port", str(port),
               *options]
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"serve stopped: {server.stderr.read()[-2000:]}")
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        request = urllib.request.Request(f"{base}/v1/models/{model.name}/predict", data=image.read_bytes(),
                                         headers={"content-type": "image/png"})
        score = json.loads(urllib.request.urlopen(request, timeout=600).read())["score"]
        answered = time.perf_counter() - started
    finally:
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        for child in children:  # the interpreter under time: it shuts the server down on SIGINT
            os.kill(int(child), signal.SIGINT)
        _, errors = server.communicate(timeout=60)
    peak = next((int(line.split(":")[1]) for line in errors.splitlines() if "Maximum resident set size" in line), 0)
    return {"seconds": answered, "peak_mib": peak / 1024, "score": score}


def commands(data: Path, before: str | None, scratch: Path) -> None:
    """Fit, evaluate and serve at the defaults on ``data`` (an MVTec category): this tree with a
    cold and a warm network cache, and the tree ``before`` (its ``src``) when given."""
    trees = [("after, empty cache", None, True), ("after, warm cache", None, False)]
    if before:
        trees.insert(0, ("before", before, False))
    cache = scratch / "network-cache"
    image = sorted((data / "test" / "broken_large").glob("*.png"))[0]
    for label, source, empty in trees:
        env = {**os.environ, "PATCHCORE_CACHE": str(cache)}
        if source:
            env["PYTHONPATH"] = source
        if empty:
            shutil.rmtree(cache, ignore_errors=True)
        name = label.split(",")[0] + ("-cold" if empty else "")
        model = scratch / "models" / name.replace(" ", "-")
        shutil.rmtree(model, ignore_errors=True)
        fit = timed([sys.executable, "-m", "patchcore.cli", "fit", str(data / "train" / "good"), "-o", str(model)], env)
        if empty:
            shutil.rmtree(cache, ignore_errors=True)
        evaluate = timed([sys.executable, "-m", "patchcore.cli", "evaluate", str(data), "-o",
                          str(scratch / f"evaluation-{name}"), "--json"], env)
        served = serve_once(model, image, env)
        print(f"{label:20s} fit {fit['seconds']:6.1f} s {fit['peak_mib']:6.0f} MiB | evaluate {evaluate['seconds']:6.1f} s "
              f"{evaluate['peak_mib']:6.0f} MiB | serve to first answer {served['seconds']:5.1f} s "
              f"{served['peak_mib']:5.0f} MiB (score {served['score']:.4f}) | status {fit['status']}/{evaluate['status']}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,2000,4000")
    parser.add_argument("--coverage", type=int, default=60000, help="vectors for the coverage comparison (0: skip)")
    parser.add_argument("--folder", default=None, help="where the generated images go (default: a temporary folder)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--commands", action="store_true", help="fit, evaluate and serve on --data (see above)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle")
    parser.add_argument("--before", default=None, metavar="SRC", help="with --commands: another tree's src folder")
    args = parser.parse_args()
    if args.commands:
        if not (args.data / "train" / "good").is_dir():
            parser.error(f"{args.data}: not an MVTec category (no train/good); give one with --data")
        with tempfile.TemporaryDirectory() as scratch:
            commands(args.data, args.before, Path(scratch))
        return
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
