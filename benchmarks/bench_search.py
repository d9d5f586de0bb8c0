"""Search and map time per photo, this tree against an older checkout (issue 17; prints figures, not a test).

    git archive 4a25a46 src | tar -x -C /tmp/base          # the checkout to compare with
    python benchmarks/bench_search.py --baseline-src /tmp/base/src
    python benchmarks/bench_search.py --baseline-src /tmp/base/src --evaluate   # + patchcore evaluate, both trees

What follows the network is timed on the same patch features for both trees: each data set's
model is fitted once at the defaults with this tree (bottle: 900x900 PNG, 48x48 patches against
~4,800 bank vectors; macaroni1: 72x48 patches against ~31,000, the grid of a 1500x1000 photo
at shorter side 384) and its test photos' features are computed once (``--cache`` keeps them).
Then, in a fresh process per tree (``PYTHONPATH``), the scoring runs as ``predict`` runs it: the
search (first pass, exact re-check of the highest patches, eq. 7) and the full-size map, all
photos in one call (batches of 4) and one photo per call; macaroni1's maps are also made at
1500x1000. Trees alternate for ``--rounds`` rounds; each figure is the median over photos of the
best round. Both trees' image scores are compared (they must agree: both equal exact search's).

``--evaluate`` runs what ``patchcore evaluate`` runs, at the defaults, with each tree on both data
sets (image AUROC, pixel AUROC, AUPRO, and the stages' ms per photo of the real pipeline: decoding
and network, search, map).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = {"bottle": SHARED / "mvtec" / "bottle", "macaroni1": SHARED / "visa" / "macaroni1"}
THIS_SRC = Path(__file__).resolve().parents[1] / "src"
PLACEMENT_FIELDS = ("image_size", "box", "content_size", "input_size", "cell")


def prepare(name: str, folder: Path, photos: int) -> None:
    """Fit at the defaults (this tree) and keep the bank and the test photos' patch features."""
    from patchcore import PatchCore
    from patchcore.engine.images import read_image

    if (folder / f"{name}.npz").is_file():
        return
    root = DATA[name]
    train = sorted(p for p in (root / "train" / "good").iterdir() if p.is_file())
    test = sorted(p for p in (root / "test").glob("*/*") if p.is_file())
    test = test[:: max(1, len(test) // photos)][:photos]  # every defect type, not only the first folder
    model = PatchCore().fit(train)
    arrays, placements = {"bank": model.memory_bank_}, []
    for i, path in enumerate(test):
        pixels, placement = model.transform_(read_image(path))
        rows, columns = placement.grid_size
        arrays[f"f{i}"] = model.embed(pixels[None])[0][:rows, :columns]
        placements.append({key: getattr(placement, key) for key in PLACEMENT_FIELDS})
    np.savez(folder / f"{name}.npz", **arrays)
    (folder / f"{name}.json").write_text(json.dumps(placements))


def worker(name: str, folder: Path, mode: str, threads: int | None) -> dict:
    """Time search and maps with whatever ``patchcore`` is importable (this tree or the baseline);
    ``threads``: numpy's BLAS and faiss's OpenMP held at that many threads (else each tree's own choice)."""
    if threads:
        import faiss
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
        faiss.omp_set_num_threads(threads)
        from patchcore.engine import search

        if hasattr(search, "IDLE_CORES"):
            search.IDLE_CORES.free = lambda limit=None: threads
    from patchcore.engine import detector as detector_module
    from patchcore.engine.geometry import Placement
    from patchcore.engine.scoring import anomaly_map
    from patchcore.engine.settings import ModelSettings

    data = np.load(folder / f"{name}.npz")
    placements = [Placement(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
                  for p in json.loads((folder / f"{name}.json").read_text())]
    grids = [data[f"f{i}"] for i in range(len(placements))]

    class Bench(detector_module.Detector):
        def settings(self) -> ModelSettings:
            return ModelSettings()

    model = Bench()
    model._set_memory_bank(data["bank"])
    model._start_bank_state()
    new = hasattr(model, "score_images")
    big = Placement((1000, 1500), (0.0, 0.0, 1500.0, 1000.0), (384, 576), (384, 576), 8)
    batch = 1 if mode == "single" else 4
    search_ms, map_ms, big_map_ms, scores, threads_used = [], [], [], [], []
    for start in range(0, len(grids), batch):
        features = [g.reshape(-1, g.shape[-1]) for g in grids[start : start + batch]]
        shapes = [g.shape[:2] for g in grids[start : start + batch]]
        where = placements[start : start + batch]
        if new:  # as iter_predict: one batch's search and maps under the thread choice
            from patchcore.engine.search import IDLE_CORES, search_threads

            threads_used.append(IDLE_CORES.free())
            with search_threads(threads_used[-1]):
                t0 = time.perf_counter()
                scored = model.score_images(features)
                search_ms += [1000 * (time.perf_counter() - t0) / len(features)] * len(features)
                for (patch_scores, _, score), shape, placement in zip(scored, shapes, where):
                    t1 = time.perf_counter()
                    anomaly_map(patch_scores.reshape(shape), placement, 4.0)
                    map_ms.append(1000 * (time.perf_counter() - t1))
                    if shape == big.grid_size:
                        t1 = time.perf_counter()
                        anomaly_map(patch_scores.reshape(shape), big, 4.0)
                        big_map_ms.append(1000 * (time.perf_counter() - t1))
                    scores.append(score)
        else:  # the former iter_predict: each photo searched and mapped on its own
            for patches, shape, placement in zip(features, shapes, where):
                t0 = time.perf_counter()
                patch_scores, nearest = model.score_patches(patches)
                score = model.image_score(patch_scores, nearest, patches)
                t1 = time.perf_counter()
                anomaly_map(patch_scores.reshape(shape), placement, 4.0)
                t2 = time.perf_counter()
                search_ms.append(1000 * (t1 - t0))
                map_ms.append(1000 * (t2 - t1))
                if shape == big.grid_size:
                    t1 = time.perf_counter()
                    anomaly_map(patch_scores.reshape(shape), big, 4.0)
                    big_map_ms.append(1000 * (time.perf_counter() - t1))
                scores.append(score)
    index = model.index_
    return {"module": detector_module.__file__, "index": getattr(index, "description", type(index).__name__), "bank": int(len(data["bank"])),
            "search_ms": float(np.median(search_ms)), "map_ms": float(np.median(map_ms)),
            "big_map_ms": float(np.median(big_map_ms)) if big_map_ms else None, "scores": [float(s) for s in scores],
            "threads": sorted(set(threads_used)) if threads_used else ["library default"]}


def run_worker(src: Path, name: str, folder: Path, mode: str, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run([sys.executable, __file__, "--worker", name, "--cache", str(folder), "--mode", mode]
                            + (["--threads", str(threads)] if threads else []),
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def evaluate_here(name: str) -> dict:
    """``patchcore evaluate`` at the defaults, in process (its result row has each stage's ms per photo)."""
    from patchcore import PatchCore
    from patchcore.evaluation.datasets import load_mvtec_category
    from patchcore.evaluation.evaluate import evaluate_dataset

    row = evaluate_dataset(PatchCore(), load_mvtec_category(DATA[name].parent, DATA[name].name), None)
    return {key: value for key, value in row.items() if isinstance(value, (int, float, str)) or value is None}


def evaluate(src: Path, name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run([sys.executable, __file__, "--evaluate-worker", name], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, help="src folder of the checkout to compare with (required)")
    parser.add_argument("--src", type=Path, default=THIS_SRC, help="src folder of the tree to measure (default: this one)")
    parser.add_argument("--datasets", default="bottle,macaroni1")
    parser.add_argument("--photos", type=int, default=40, help="test photos per data set")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=None, help="folder for the fitted banks and features (reused)")
    parser.add_argument("--threads", type=int, default=None,
                        help="hold numpy's BLAS and faiss at this many threads in both trees (default: each tree's own)")
    parser.add_argument("--evaluate", action="store_true", help="also run patchcore evaluate with both trees")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--evaluate-worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="batch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.evaluate_worker:
        print(json.dumps(evaluate_here(args.evaluate_worker)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.cache, args.mode, args.threads)))
        return
    if args.baseline_src is None:
        parser.error("--baseline-src is required")
    folder = args.cache or Path(tempfile.mkdtemp(prefix="bench_search_"))
    folder.mkdir(parents=True, exist_ok=True)
    trees = {"before": args.baseline_src.resolve(), "after": args.src.resolve()}
    threads = f"{args.threads} thread(s) in both trees" if args.threads else "threads: each tree's own choice"
    print(f"{load()}; cores {os.cpu_count()}; {threads}; features in {folder}", flush=True)
    for name in args.datasets.split(","):
        prepare(name, folder, args.photos)
        best: dict[tuple[str, str], dict] = {}
        for _ in range(args.rounds):
            for mode in ("batch", "single"):
                for tree, src in trees.items():
                    row = run_worker(src, name, folder, mode, args.threads)
                    if not row["module"].startswith(str(src)):
                        raise RuntimeError(f"the {tree} worker imported {row['module']}, not the tree in {src}")
                    key = (tree, mode)
                    if key not in best or row["search_ms"] + row["map_ms"] < best[key]["search_ms"] + best[key]["map_ms"]:
                        best[key] = row
        print(f"\n{name}: {best[('after', 'batch')]['bank']} bank vectors, {len(best[('after', 'batch')]['scores'])} photos; "
              f"{load()}")
        print(f"  {'':8s} {'mode':13s} {'index':32s} {'search ms':>9s} {'map ms':>7s} {'1500x1000 map':>13s}  threads")
        for mode, label in (("batch", "all in one"), ("single", "one per call")):
            for tree in trees:
                row = best[(tree, mode)]
                big = f"{row['big_map_ms']:13.2f}" if row["big_map_ms"] is not None else f"{'-':>13s}"
                threads = "held" if args.threads else ",".join(str(t) for t in row["threads"])
                print(f"  {tree:8s} {label:13s} {row['index'][:32]:32s} {row['search_ms']:9.2f} {row['map_ms']:7.2f} {big}  {threads}")
            before, after = best[("before", mode)], best[("after", mode)]
            print(f"  {'ratio':8s} {label:13s} {'after / before':32s} {after['search_ms'] / before['search_ms']:9.2f} "
                  f"{after['map_ms'] / before['map_ms']:7.2f}"
                  + (f" {after['big_map_ms'] / before['big_map_ms']:13.2f}" if after["big_map_ms"] else ""))
        before, after = np.array(best[("before", "batch")]["scores"]), np.array(best[("after", "batch")]["scores"])
        single = np.array(best[("after", "single")]["scores"])
        print(f"  image scores: after vs before max relative difference {np.max(np.abs(after - before) / before):.1e}; "
              f"all in one vs one per call {np.max(np.abs(after - single) / single):.1e}")
    if args.evaluate:
        print(f"\npatchcore evaluate at the defaults, each tree's own threads ({load()})")
        print(f"  {'data set':10s} {'tree':7s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'AUPRO':>7s} {'ms/photo':>8s} "
              f"{'backbone':>8s} {'search':>7s} {'map':>6s}")
        for name in args.datasets.split(","):
            for tree, src in trees.items():
                row = evaluate(src, name)
                print(f"  {name:10s} {tree:7s} {100 * row['image_auroc']:11.2f} {100 * row['pixel_auroc']:11.2f} "
                      f"{100 * row['aupro']:7.2f} {row['ms_per_image']:8.1f} {row.get('ms_backbone', 0):8.1f} "
                      f"{row.get('ms_search', 0):7.1f} {row.get('ms_map', 0):6.1f}", flush=True)
        print(f"  ({load()})")


if __name__ == "__main__":
    main()
