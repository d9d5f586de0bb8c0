"""Inference speed side by side, and steadiness on a busy machine (prints figures; not a test).

    python benchmarks/bench_inference.py                          # this tree: torch vs ONNX Runtime vs export
    python benchmarks/bench_inference.py --baseline-src OLD/src   # also an older checkout's torch path
    python benchmarks/bench_inference.py --busy 2                 # fit and predict beside 2 CPU burners

Speed: MVTec bottle (900x900 PNG), lite0, a 1% bank, one model per configuration fitted on the
first 60 training images, then ``predict`` in process on 60 test photos given as file paths
(decoding, network, search and full-size maps all included), one photo per call (latency) and
all in one call (throughput, images/s). Configurations, each in a fresh process:

- ``baseline``: the older checkout's default torch path (with ``--baseline-src``);
- ``torch``: this tree, the network in torch;
- ``onnxruntime``: this tree, the network as an ONNX graph (the default on the CPU);
- ``export``: the model exported and loaded by the torch-free runtime.

Busy machine: fit (all 209 training images) and predict beside ``--busy`` processes that each
keep a core busy, against the same on a quiet machine; prints the slowdown ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"
SETTINGS = {"coreset_ratio": 0.01}


def _photos(n_train: int, n_test: int) -> tuple[list[Path], list[Path]]:
    train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:n_train]
    test = sorted((BOTTLE / "test").glob("*/*.png"))
    return train, (test * (n_test // len(test) + 1))[:n_test]


def speed_one(config: str, n_train: int, n_test: int, preset: str | None = None) -> dict:
    """Fit, then time predict: per call of one photo, and all photos in one call."""
    import patchcore
    from patchcore import PatchCore

    train, test = _photos(n_train, n_test)
    settings = {**(patchcore.PRESETS[preset] if preset else {}), **SETTINGS}
    if config in ("torch", "onnxruntime") and hasattr(patchcore, "DEFAULTS"):
        settings["runtime"] = config
    model = PatchCore(**settings)
    if config == "baseline":  # the older default geometry: shorter side 256, centre crop 224
        model = PatchCore(coreset_ratio=0.01)
    model.fit(train)
    if config == "export":
        from patchcore.engine.export import export_model

        folder = tempfile.mkdtemp()
        export_model(model, folder)
        model = patchcore.load_model(folder)
    model.predict(test[:2])  # warm-up
    started = time.perf_counter()
    for photo in test:
        model.predict([photo])
    latency = 1000 * (time.perf_counter() - started) / len(test)
    started = time.perf_counter()
    model.predict(test)
    throughput = len(test) / (time.perf_counter() - started)
    return {"config": config, "ms_per_photo": latency, "images_per_second": throughput,
            "settings": {k: v for k, v in model.get_params().items() if k in ("resize", "crop", "coreset_ratio")}
            if hasattr(model, "get_params") else "export"}


def busy_one(n_train: int, n_test: int) -> dict:
    from patchcore import PatchCore

    train, test = _photos(n_train, n_test)
    started = time.perf_counter()
    model = PatchCore(**SETTINGS).fit(train)
    fit = time.perf_counter() - started
    started = time.perf_counter()
    model.predict(test)
    return {"fit_seconds": fit, "coreset_seconds": model.fit_timings_["coreset"], "predict_seconds": time.perf_counter() - started}


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100000):
            x += 1


def _run(args: list[str], pythonpath: str | None = None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", default=None, help="src folder of an older checkout to compare with")
    parser.add_argument("--configs", default="torch,onnxruntime,export")
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--busy", type=int, default=0, help="CPU burners beside the busy-machine run (0: skip it)")
    parser.add_argument("--preset", default=None, help="settings preset for this tree's configurations (e.g. paper: "
                                                        "the older default geometry, for a like-for-like comparison)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one == "busy":
        print(json.dumps(busy_one(args.train, args.test)))
        return
    if args.one:
        print(json.dumps(speed_one(args.one, args.train, args.test, args.preset)))
        return
    if not BOTTLE.is_dir():
        sys.exit(f"needs MVTec bottle at {BOTTLE}")
    rows = []
    configs = (["baseline"] if args.baseline_src else []) + args.configs.split(",")
    for config in configs:
        row = _run(["--one", config, "--train", str(args.train), "--test", str(args.test)]
                   + (["--preset", args.preset] if args.preset and config != "baseline" else []),
                   args.baseline_src if config == "baseline" else None)
        rows.append(row)
        print(f"{config:12s} {row['ms_per_photo']:7.1f} ms per photo (one per call), "
              f"{row['images_per_second']:5.1f} images/s (all in one call)  {row['settings']}", flush=True)
    if rows:
        reference = rows[0]
        for row in rows[1:]:
            print(f"{row['config']:12s} / {reference['config']}: latency x{row['ms_per_photo'] / reference['ms_per_photo']:.2f}, "
                  f"throughput x{row['images_per_second'] / reference['images_per_second']:.2f}")
    if args.busy:
        quiet = _run(["--one", "busy", "--train", "209", "--test", "83"])
        stop = multiprocessing.Event()
        burners = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.busy)]
        for burner in burners:
            burner.start()
        try:
            busy = _run(["--one", "busy", "--train", "209", "--test", "83"])
        finally:
            stop.set()
            for burner in burners:
                burner.join()
        for key in ("fit_seconds", "coreset_seconds", "predict_seconds"):
            print(f"{key:16s} quiet {quiet[key]:6.1f} s, beside {args.busy} busy processes {busy[key]:6.1f} s: "
                  f"x{busy[key] / quiet[key]:.2f}")


if __name__ == "__main__":
    main()
