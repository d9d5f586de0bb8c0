"""Issue 17's table: speed per photo, fit time and peak memory, before and after, in one run (prints it).

    git worktree add /tmp/before 94cd03e          # the code this table compares against
    python benchmarks/bench_speed.py --before /tmp/before/src

Every figure is measured in a fresh process, the two trees one after the other for each row
(interleaved, so that a machine that gets busier hurts both alike), with the same virtual
environment; ``--before`` puts the other tree first on ``PYTHONPATH``. Per photo: in-process
``predict`` from the files (decoding, network, search and full-size maps all included) after one
warm-up photo; "all in one call" is every test photo in one call (ms per photo), "per call" one
photo per call (the mean). Rows:

- MVTec bottle (900x900 PNG, 209 training / 83 test photos) at the defaults, and in anomalib's
  protocol (efficientnet_lite0, shorter side 256, centre crop 224, 1% bank);
- a 1500x1000 JPEG at the defaults (VisA macaroni1's test photos upscaled to their original size,
  the model fitted on all 900 macaroni1 training photos);
- fit at the defaults on bottle and on 210 photos of 600x800 (macaroni1's resized);
- peak RSS (``/usr/bin/time -v``) of ``patchcore evaluate`` on bottle, of ``patchcore serve`` of a
  saved bottle model and of its export after one request, and of ``patchcore fit`` on 4,000
  generated 224x224 JPEGs.

anomalib 2.7's figures are the issue's (its own 224 crop, lite0, 1%), measured on this machine.
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

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BOTTLE = SHARED / "mvtec" / "bottle"
MACARONI = SHARED / "visa" / "macaroni1"
ANOMALIB_PROTOCOL = {"backbone": "efficientnet_lite0", "resize": 256, "crop": 224, "coreset_ratio": 0.01,
                     "max_bank_size": None}
#: (row, anomalib 2.7's figure from the issue, the issue's target for this tree).
ROWS = [
    ("bottle, defaults: ms per photo, all in one call", "67.6", "<= 40"),
    ("bottle, defaults: ms per photo, one per call", "67.6", "<= 60"),
    ("bottle, anomalib's protocol: ms per photo, all in one call", "67.6", "<= 20"),
    ("bottle, anomalib's protocol: ms per photo, one per call", "67.6", ""),
    ("1500x1000 JPEG, defaults: ms per photo, all in one call", "123", "<= 60"),
    ("fit, defaults: bottle (s)", "120", "<= 12"),
    ("fit, defaults: 210 photos of 600x800 (s)", "120", "<= 12"),
    ("evaluate bottle: peak RSS (GB)", "2.63", "<= 1.3"),
    ("serve a saved model: peak RSS (GB)", "", "<= 0.3"),
    ("serve its export: peak RSS (GB)", "", ""),
    ("fit 4,000 224 px JPEGs via the CLI: peak RSS (GB)", "", "<= 1.0"),
]


# -- what runs in the measured processes -----------------------------------------------------------

def _per_photo(model, photos: list[Path]) -> tuple[float, float]:
    """(ms per photo all in one call, mean ms per photo one per call), after one warm-up photo."""
    model.predict(photos[:1])
    started = time.perf_counter()
    model.predict(photos)
    together = (time.perf_counter() - started) / len(photos)
    single = []
    for photo in photos:
        started = time.perf_counter()
        model.predict([photo])
        single.append(time.perf_counter() - started)
    return 1000 * together, 1000 * float(np.mean(single))


def job_bottle(settings: dict) -> dict:
    from patchcore import PatchCore

    train = sorted((BOTTLE / "train" / "good").glob("*.png"))
    test = sorted((BOTTLE / "test").glob("*/*.png"))
    started = time.perf_counter()
    model = PatchCore(**settings).fit(train)
    fit = time.perf_counter() - started
    together, single = _per_photo(model, test)
    return {"fit_seconds": fit, "together_ms": together, "single_ms": single}


def job_jpeg(folder: str) -> dict:
    from patchcore import PatchCore

    model = PatchCore().fit(sorted((MACARONI / "train" / "good").glob("*.JPG")) or
                            sorted((MACARONI / "train" / "good").glob("*")))
    photos = sorted(Path(folder).glob("*.jpg"))
    model.predict(photos[:1])
    started = time.perf_counter()
    model.predict(photos)
    return {"together_ms": 1000 * (time.perf_counter() - started) / len(photos)}


def job_warm(backbones: list[str]) -> dict:
    """Fill the network cache (a deployed model has built its graph once; not part of a fit's time)."""
    from patchcore import PatchCore

    photos = sorted((BOTTLE / "train" / "good").glob("*.png"))[:2]
    for backbone in backbones:
        PatchCore(backbone=backbone, resize=64).fit(photos)
    return {}


def job_fit(folder: str) -> dict:
    from patchcore import PatchCore

    started = time.perf_counter()
    PatchCore().fit(sorted(Path(folder).iterdir()))
    return {"fit_seconds": time.perf_counter() - started}


JOBS = {"bottle": job_bottle, "jpeg": job_jpeg, "fit": job_fit, "warm": job_warm}


# -- the driver ----------------------------------------------------------------------------------------

def _env(source: str | None, cache: Path) -> dict[str, str]:
    env = {**os.environ, "PATCHCORE_CACHE": str(cache), "PYTHONPATH": source or str(Path(__file__).resolve().parents[1] / "src")}
    return env


def run_job(name: str, argument, source: str | None, cache: Path) -> dict:
    """One job of this file in a fresh process with ``source`` first on the path."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_speed as b; "
            f"print(json.dumps(b.JOBS[{name!r}]({argument!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(source, cache))
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss(command: list[str], source: str | None, cache: Path) -> float:
    """Peak RSS in GB of a ``patchcore`` command (``/usr/bin/time -v``)."""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "patchcore.cli", *command], capture_output=True,
                          text=True, env=_env(source, cache))
    if done.returncode != 0:
        raise RuntimeError(f"patchcore {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    kib = next(int(line.split(":")[1]) for line in done.stderr.splitlines() if "Maximum resident set size" in line)
    return kib * 1024 / 1e9


def serve_peak_rss(model: Path, photo: Path, source: str | None, cache: Path) -> float:
    """Peak RSS in GB of ``patchcore serve MODEL`` that has answered one request."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_memory import serve_once

    env = _env(source, cache)
    help_text = subprocess.run([sys.executable, "-m", "patchcore.cli", "serve", "--help"], capture_output=True, text=True,
                               env=env).stdout
    options = ("--no-teach-in",) if "--no-teach-in" in help_text else ()  # a tree from before teach-in tokens
    return serve_once(model, photo, env, options)["peak_mib"] * 2**20 / 1e9


def prepare(scratch: Path) -> dict[str, Path]:
    """The generated data: 1500x1000 JPEGs, 600x800 photos, 4,000 224x224 JPEGs."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_memory import texture

    folders = {"jpeg": scratch / "macaroni1-1500x1000", "fit600": scratch / "photos-600x800", "many": scratch / "4000-jpegs"}
    if not folders["jpeg"].is_dir():
        folders["jpeg"].mkdir(parents=True)
        for i, path in enumerate(sorted((MACARONI / "test").glob("*/*"))[::7][:30]):
            Image.open(path).convert("RGB").resize((1500, 1000), Image.BICUBIC).save(folders["jpeg"] / f"{i:03d}.jpg", quality=90)
    if not folders["fit600"].is_dir():
        folders["fit600"].mkdir(parents=True)
        for i, path in enumerate(sorted((MACARONI / "train" / "good").iterdir())[:210]):
            Image.open(path).convert("RGB").resize((600, 800), Image.BICUBIC).save(folders["fit600"] / f"{i:03d}.jpg", quality=90)
    if not folders["many"].is_dir():
        folders["many"].mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(4000):
            Image.fromarray(texture(rng, 224)).save(folders["many"] / f"{i:05d}.jpg", quality=90)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, metavar="SRC", help="the other tree's src folder (the 'before' column)")
    parser.add_argument("--scratch", default=None, metavar="DIR", help="folder for generated data and models (kept)")
    parser.add_argument("--skip-many", action="store_true", help="leave out the 4,000-image fit (the longest row)")
    args = parser.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-speed-"))
    folders = prepare(scratch)
    trees = ([("before", args.before)] if args.before else []) + [("after", None)]
    caches = {label: scratch / f"cache-{label}" for label, _ in trees}
    results: dict[str, dict[str, str]] = {label: {} for label, _ in trees}
    for label, source in trees:
        run_job("warm", ["efficientnet_lite2", "efficientnet_lite0"], source, caches[label])
    print(f"load before: {os.getloadavg()[0]:.1f}", flush=True)

    def measure(row: int, work) -> None:
        for label, source in trees:
            value = work(label, source)
            results[label][ROWS[row][0]] = value
            print(f"  {label:6s} {ROWS[row][0]}: {value}", flush=True)

    for row, settings in ((0, {}), (2, ANOMALIB_PROTOCOL)):
        measured = {}
        for label, source in trees:
            measured[label] = run_job("bottle", settings, source, caches[label])
        for label in measured:
            results[label][ROWS[row][0]] = f"{measured[label]['together_ms']:.1f}"
            results[label][ROWS[row + 1][0]] = f"{measured[label]['single_ms']:.1f}"
            if row == 0:
                results[label][ROWS[5][0]] = f"{measured[label]['fit_seconds']:.1f}"
        print(f"  bottle {settings or 'defaults'}: {measured}", flush=True)
    measure(4, lambda label, source: f"{run_job('jpeg', str(folders['jpeg']), source, caches[label])['together_ms']:.1f}")
    measure(6, lambda label, source: f"{run_job('fit', str(folders['fit600']), source, caches[label])['fit_seconds']:.1f}")
    measure(7, lambda label, source: f"{peak_rss(['evaluate', str(BOTTLE), '-o', str(scratch / ('evaluate-' + label)), '--json'], source, caches[label]):.2f}")

    def serve_rows(label: str, source: str | None) -> None:
        model, export = scratch / f"model-{label}", scratch / f"export-{label}"
        for folder in (model, export):
            shutil.rmtree(folder, ignore_errors=True)
        env = _env(source, caches[label])
        subprocess.run([sys.executable, "-m", "patchcore.cli", "fit", str(BOTTLE / "train" / "good"), "-o", str(model)],
                       check=True, capture_output=True, env=env)
        subprocess.run([sys.executable, "-m", "patchcore.cli", "export", str(model), "-o", str(export)], check=True,
                       capture_output=True, env=env)
        photo = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))[0]
        results[label][ROWS[8][0]] = f"{serve_peak_rss(model, photo, source, caches[label]):.2f}"
        results[label][ROWS[9][0]] = f"{serve_peak_rss(export, photo, source, caches[label]):.2f}"
        print(f"  {label:6s} serve: {results[label][ROWS[8][0]]} / {results[label][ROWS[9][0]]} GB", flush=True)

    for label, source in trees:
        serve_rows(label, source)
    if not args.skip_many:
        measure(10, lambda label, source: f"{peak_rss(['fit', str(folders['many']), '-o', str(scratch / ('many-' + label))], source, caches[label]):.2f}")
    print(f"load after: {os.getloadavg()[0]:.1f}\n")
    header = "| | " + " | ".join(label for label, _ in trees) + " | anomalib 2.7 | target |"
    print(header)
    print("| --- |" + " ---: |" * (len(trees) + 2))
    for name, anomalib, target in ROWS:
        print(f"| {name} | " + " | ".join(results[label].get(name, "-") for label, _ in trees) + f" | {anomalib} | {target} |")


if __name__ == "__main__":
    main()
