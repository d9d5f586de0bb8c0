"""Issue 20: one model's fit on Ray against the fit on one machine (prints figures).

    python benchmarks/bench_distributed_fit.py                 # bottle's photos x4, every way to fit
    python benchmarks/bench_distributed_fit.py --copies 1 --ways local ray-2x1
    python benchmarks/bench_distributed_fit.py --part merge    # the driver's merge against the union's size

``fits``: MVTec bottle's 209 training photos (900x900 PNG), each linked ``--copies`` times under
another name (a line's many photos of one product), fitted at the defaults (efficientnet_lite2,
shorter side 384, 1% bank capped at 40,000) in one fresh process per way, the ways interleaved:

- ``local``: ``PatchCore.fit`` on this machine (chunked: bottle's photos give ~480,000 patches
  each time, above the 250,000 of exact greedy);
- ``ray-WxC``: ``patchcore.fleet.distributed_fit.fit_on_ray`` on a local Ray of W workers with C
  cores each (Ray's start is timed apart: a cluster is already running).

Each prints its wall seconds by stage (setup = the network and the first photo on the driver;
chunks = the workers' part, wall, with the seconds the workers spent on features and on their
chunks' coresets; merge; index), the driver's peak RSS, and whether its bank equals the local
fit's (bit for bit).

``merge``: the driver's greedy over the union of the chunks' picks, for unions of about 10,000 to
80,000 (the union is about twice the bank: 80,000 at the 40,000 cap): what a cluster's merge costs
as the bank grows to the cap (it follows union x bank, not the number of photos). The unions are
real: bottle's 481,536 patches at the defaults, reduced chunk by chunk at the ratio that gives
each union size.
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

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec" / "bottle"


def photo_folder(copies: int, scratch: Path) -> Path:
    """Bottle's training photos, each linked ``copies`` times (distinct names, same pixels)."""
    folder = scratch / f"bottle-x{copies}"
    if not folder.exists():
        folder.mkdir(parents=True)
        for copy in range(copies):
            for photo in sorted((BOTTLE / "train" / "good").glob("*.png")):
                os.symlink(photo, folder / f"{copy}-{photo.name}")
    return folder


def one_way(way: str, folder: Path, bank_file: Path) -> dict:
    """Fit one way in this process; the bank goes to ``bank_file`` (.npy) for the comparison."""
    from patchcore import PatchCore

    started = time.perf_counter()
    result: dict = {"way": way}
    if way == "local":
        model = PatchCore().fit(folder)
    else:
        workers, cpus = (int(n) for n in way.removeprefix("ray-").split("x"))
        from patchcore.fleet.distributed_fit import fit_on_ray
        from patchcore.fleet.ray_runtime import connect

        connect(None, workers * cpus)
        result["ray_start"] = time.perf_counter() - started
        started = time.perf_counter()
        model = fit_on_ray(PatchCore(), [folder], workers=workers, cpus_per_worker=cpus, progress=False)
    result["seconds"] = time.perf_counter() - started
    result["stages"] = {key: round(value, 2) for key, value in model.fit_timings_.items()}
    result["photos"] = model.n_training_images_
    result["patches"] = model.n_training_patches_
    result["bank"] = len(model.memory_bank_)
    result["driver_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    workers = {} if way == "local" else model.ray_workers_
    result["worker_peak_rss_gb"] = max((w["peak_rss_bytes"] for w in workers.values()), default=0) / 2**30
    result["chunks_per_worker"] = sorted(w["chunks"] for w in workers.values())
    np.save(bank_file, model.memory_bank_)
    return result


def fits(args: argparse.Namespace) -> None:
    scratch = Path(args.scratch)
    folder = photo_folder(args.copies, scratch)
    print(f"{len(list(folder.iterdir()))} photos in {folder}; ways: {', '.join(args.ways)}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for rep in range(args.reps):
        for way in args.ways:
            bank = scratch / f"bank-{folder.name}-{way}.npy"
            out = subprocess.run([sys.executable, __file__, "--one", way, "--folder", str(folder), "--bank", str(bank)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{way} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            local = scratch / f"bank-{folder.name}-local.npy"  # None: no local fit of these photos yet
            result["same_bank_as_local"] = np.array_equal(np.load(bank), np.load(local)) if local.exists() else None
            results.append(result)
            print(json.dumps(result), flush=True)
    print("\n| way | photos | patches | wall s | Ray start s | stages (s) | driver / worker peak RSS GB | bank = local's |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for r in results:
        stages = ", ".join(f"{k} {v}" for k, v in r["stages"].items())
        print(f"| {r['way']} | {r['photos']} | {r['patches']} | {r['seconds']:.1f} | {r.get('ray_start', 0):.1f} | "
              f"{stages} | {r['driver_peak_rss_gb']:.2f} / {r['worker_peak_rss_gb']:.2f} | {r['same_bank_as_local']} |")


def merge(args: argparse.Namespace) -> None:
    from patchcore import PatchCore
    from patchcore.engine.chunks import CoresetSettings, merge_chunks, reduce_store
    from patchcore.engine.coreset import Chunking

    print("| union (picks of all chunks) | bank chosen | chunks' greedy s (all chunks) | merge s (the driver) |")
    print("| ---: | ---: | ---: | ---: |")
    with PatchCore().extract_patches(sorted((BOTTLE / "train" / "good").glob("*.png"))) as store:
        for union in (10_000, 20_000, 40_000, 80_000):
            # The ratio whose chunks keep about `union` picks in all (each keeps twice its share).
            settings = CoresetSettings(union / (2 * len(store)), None, 128, 0)
            started = time.perf_counter()
            chunks = reduce_store(store, settings, Chunking(), 0)
            reduced = time.perf_counter() - started
            started = time.perf_counter()
            bank = merge_chunks(chunks, settings)
            print(f"| {sum(len(c.picks) for c in chunks):,} | {len(bank.memory_bank):,} | {reduced:.1f} | "
                  f"{time.perf_counter() - started:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["fits", "merge"], default="fits")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--ways", nargs="+", default=["local", "ray-1x2", "ray-1x1", "ray-2x1"])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "bench-distributed-fit"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--bank", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_way(args.one, Path(args.folder), Path(args.bank))))
    elif args.part == "merge":
        merge(args)
    else:
        fits(args)


if __name__ == "__main__":
    main()
