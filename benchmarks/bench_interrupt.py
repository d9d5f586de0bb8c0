"""How promptly ``patchcore fit``, ``evaluate`` and ``predict`` stop on SIGINT and SIGTERM, at each
stage, and what they leave behind (prints a table; not a test).

    python benchmarks/bench_interrupt.py                    # generated images, and MVTec bottle when present
    python benchmarks/bench_interrupt.py --no-bottle        # generated images only
    python benchmarks/bench_interrupt.py --signals SIGINT --only fit --stages saving --repeat 5

Every row is a fresh ``patchcore`` process started as a script's background job starts (SIGINT
ignored, as ``cmd &`` in a non-interactive shell leaves it). The signal is sent when the stage
shows, from what the process prints or writes, not after a fixed time:

- fit: features (its ``features:`` progress bar), coreset (``coreset:``), saving (the model
  folder's ``.lock`` appears: ``write_model`` has begun);
- evaluate: fit (``features:``), predict (``predict:``), metrics (the ``predict:`` bar has closed:
  pixel metrics, curves and the report are being computed and written);
- predict: loading (the process has mapped torch or ONNX Runtime: the model is being loaded),
  scoring (``predict:``).

Columns: seconds from the signal to the process's end, exit status, the last line on stderr
(``+traceback`` when a traceback was printed too), and temporary files left in the output folder
and TMPDIR (``*.tmp`` and ``patchcore-*``). ``finished first`` marks a run that ended before the
signal reached it. Data: 300 generated 128x128 training photos (lite0) and, from
``shared/data/mvtec/bottle``, 60 training and 25 test photos of 900x900 at the product's defaults.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"
#: A limit only a hung run reaches.
SAFETY_SECONDS = 900
POLL_SECONDS = 0.005


# -- data ------------------------------------------------------------------------------------------


def _texture(rng: np.random.Generator, size: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """A woven-looking product photo, with a dark blotch when ``defect``; and its mask."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    texture = 0.5 + 0.25 * np.sin(x * 0.8 + phase[0]) * np.cos(y * 0.8 + phase[1])
    image = np.stack([texture, texture * 0.9 + 0.05, texture * 0.7 + 0.1], axis=-1) + rng.normal(0, 0.02, (size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    if defect:
        row, col = rng.integers(16, size - 32, size=2)
        image[row : row + 16, col : col + 16] *= 0.4
        mask[row : row + 16, col : col + 16] = 255
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


def generated_layout(root: Path, n_train: int = 300, n_test: int = 20, size: int = 128) -> Path:
    """A plain evaluate layout: ``train/``, ``good/``, ``blotch/`` and ``masks/blotch/``."""
    rng = np.random.default_rng(0)
    for folder in ("train", "good", "blotch", "masks/blotch"):
        (root / folder).mkdir(parents=True)
    for i in range(n_train):
        Image.fromarray(_texture(rng, size, False)[0]).save(root / "train" / f"{i:04d}.png")
    for i in range(n_test):
        Image.fromarray(_texture(rng, size, False)[0]).save(root / "good" / f"{i:03d}.png")
        image, mask = _texture(rng, size, True)
        Image.fromarray(image).save(root / "blotch" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / "blotch" / f"{i:03d}.png")
    return root


def bottle_subset(root: Path, bottle: Path, n_train: int = 60, per_type: int = 5) -> Path:
    """An MVTec layout ``root/bottle`` of links to the first photos of each folder of ``bottle``."""
    category = root / "bottle"
    for source in sorted((bottle / "train" / "good").glob("*.png"))[:n_train]:
        _link(source, category / "train" / "good" / source.name)
    for kind in sorted(p.name for p in (bottle / "test").iterdir() if p.is_dir()):
        for source in sorted((bottle / "test" / kind).glob("*.png"))[:per_type]:
            _link(source, category / "test" / kind / source.name)
            mask = bottle / "ground_truth" / kind / f"{source.stem}_mask.png"
            if mask.exists():
                _link(mask, category / "ground_truth" / kind / mask.name)
    return root


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)


# -- one interrupted run ---------------------------------------------------------------------------


class Run:
    """A ``patchcore`` process whose stderr a thread collects."""

    def __init__(self, args: list[str], scratch: Path) -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(scratch)}
        env.pop("PYTHONFAULTHANDLER", None)
        self.started = time.monotonic()
        # SIGINT ignored, as a script's background job starts; the shell's `trap` survives its `exec`.
        self.process = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh", sys.executable, "-m", "patchcore.cli",
                                         *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stderr.fileno(), 65536):
            self.stderr += chunk

    @property
    def text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def finish(self) -> None:
        self._reader.join(SAFETY_SECONDS)
        self.process.stderr.close()


#: What shows that a stage has begun: a test on the run (its stderr, its files, its process).
Trigger = Callable[[Run], bool]


def printed(pattern: str) -> Trigger:
    compiled = re.compile(pattern)
    return lambda run: compiled.search(run.text) is not None


def appears(path: Path) -> Trigger:
    return lambda run: path.exists()


def maps_library(*names: str) -> Trigger:
    """The process has mapped one of the shared libraries ``names`` (it is importing or loading them)."""
    def test(run: Run) -> bool:
        try:
            maps = Path(f"/proc/{run.process.pid}/maps").read_text()
        except OSError:
            return False
        return any(name in maps for name in names)
    return test


STAGES = ("features", "coreset", "saving", "fit", "predict", "metrics", "loading", "scoring")


@dataclass
class Case:
    data: str
    command: str
    stage: str
    args: list[str]
    trigger: Trigger
    output: Path
    extra_folders: list[Path] = field(default_factory=list)
    #: Made ready before the run, not timed (the model that predict loads).
    prepare: Callable[[], None] | None = None


def temporary_files(*folders: Path) -> list[str]:
    """Names of the files a cut-off write leaves: ``*.tmp`` and ``patchcore-*`` (not torch's caches)."""
    found = []
    for folder in folders:
        for parent, _, names in os.walk(folder):
            found += [os.path.relpath(os.path.join(parent, name), folder) for name in names
                      if name.endswith(".tmp") or name.startswith("patchcore-")]
    return found


def interrupt(case: Case, signum: int, scratch: Path) -> dict:
    """Run ``case``, send ``signum`` when its stage shows; what happened."""
    if case.prepare is not None:
        case.prepare()
    if case.output.exists():
        shutil.rmtree(case.output)
    run = Run(case.args, scratch)
    deadline = time.monotonic() + SAFETY_SECONDS
    while not case.trigger(run) and run.process.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    seen = time.monotonic() - run.started
    if run.process.poll() is None:
        sent = time.monotonic()
        run.process.send_signal(signum)
        try:
            status = run.process.wait(timeout=SAFETY_SECONDS)
        except subprocess.TimeoutExpired:
            run.process.kill()
            status = run.process.wait()
        seconds = time.monotonic() - sent
        note = ""
    else:
        status, seconds, note = run.process.returncode, float("nan"), "finished first"
    run.finish()
    lines = [line for line in run.text.replace("\r", "\n").splitlines() if line.strip()]
    message = (lines[-1] if lines else "") + (" +traceback" if "Traceback" in run.text else "")
    left = temporary_files(case.output, scratch, *case.extra_folders)
    return {"data": case.data, "command": case.command, "stage": case.stage, "signal": signal.Signals(signum).name,
            "stage_at": seen, "seconds": seconds, "status": status, "message": message[:70],
            "left": ", ".join(left) if left else "none", "note": note}


# -- the cases -------------------------------------------------------------------------------------


def cases_for(data: str, work: Path, fit_args: list[str], train: list[str], predict_inputs: list[str],
              evaluate_args: list[str], model: Path) -> list[Case]:
    def prepare() -> None:  # a model for the predict cases
        if not (model / "patchcore.json").exists():
            subprocess.run([sys.executable, "-m", "patchcore.cli", "fit", *train, *fit_args, "-o", str(model)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    out = work / "out"
    saving = [*fit_args, "--coreset-ratio", "1", "--search-backend", "numpy"]  # a large bank: saving takes a while
    return [
        Case(data, "fit", "features", ["fit", *train, "-o", str(out), *fit_args], printed(r"features:"), out),
        Case(data, "fit", "coreset", ["fit", *train, "-o", str(out), *fit_args], printed(r"coreset:"), out),
        Case(data, "fit", "saving", ["fit", *train, "-o", str(out), *saving], appears(out / ".lock"), out),
        Case(data, "evaluate", "fit", ["evaluate", *evaluate_args, "-o", str(out)], printed(r"features:"), out),
        Case(data, "evaluate", "predict", ["evaluate", *evaluate_args, "-o", str(out)], printed(r"predict:"), out),
        Case(data, "evaluate", "metrics", ["evaluate", *evaluate_args, "-o", str(out)], printed(r"predict:[^\n]*\n"), out),
        Case(data, "predict", "loading", ["predict", str(model), *predict_inputs, "-o", str(out)],
             maps_library("libtorch_cpu", "onnxruntime_pybind"), out, [model], prepare),
        Case(data, "predict", "scoring", ["predict", str(model), *predict_inputs, "-o", str(out)], printed(r"predict:"),
             out, [model], prepare),
    ]


def generated_cases(work: Path) -> list[Case]:
    root = generated_layout(work / "data")
    fit_args = ["--backbone", "efficientnet_lite0", "--resize", "128"]
    model = work / "model"
    tests = [str(root / "good"), str(root / "blotch")] * 20  # 800 photos: scoring lasts
    return cases_for("generated", work, fit_args, [str(root / "train")], tests,
                     [str(root), "--train", str(root / "train"), *fit_args], model)


def bottle_cases(work: Path, bottle: Path) -> list[Case]:
    root = bottle_subset(work / "data", bottle)
    train = str(root / "bottle" / "train" / "good")
    model = work / "model"
    tests = [str(folder) for folder in sorted((root / "bottle" / "test").iterdir())] * 4
    return cases_for("bottle", work, [], [train], tests, [str(root), "--category", "bottle"], model)


# -- the table -------------------------------------------------------------------------------------


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def print_table(rows: list[dict]) -> None:
    header = f"{'data':10s} {'command':9s} {'stage':9s} {'signal':8s} {'stage at':>8s} {'to exit':>8s} {'status':>6s}  " \
             f"{'message':60s} temporary files left"
    print(header)
    print("-" * len(header))
    for row in rows:
        seconds = row["note"] or f"{row['seconds']:.2f} s"
        print(f"{row['data']:10s} {row['command']:9s} {row['stage']:9s} {row['signal']:8s} {row['stage_at']:7.1f}s "
              f"{seconds:>8s} {row['status']:>6d}  {row['message']:60s} {row['left']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-bottle", action="store_true", help="generated images only")
    parser.add_argument("--no-generated", action="store_true", help="MVTec bottle only")
    parser.add_argument("--bottle", type=Path, default=BOTTLE, help=f"MVTec bottle folder (default: {BOTTLE})")
    parser.add_argument("--signals", nargs="+", default=["SIGINT", "SIGTERM"], choices=["SIGINT", "SIGTERM"])
    parser.add_argument("--only", nargs="+", default=None, choices=["fit", "evaluate", "predict"], help="these commands only")
    parser.add_argument("--stages", nargs="+", default=None, choices=STAGES, help="these stages only")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case and signal (default: 1)")
    options = parser.parse_args()
    signals = [signal.Signals[name] for name in options.signals]
    print(f"load average at start: {load()} ({os.cpu_count()} cores)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-interrupt-") as folder:
        makers = [] if options.no_generated else [("generated", generated_cases)]
        if not options.no_bottle and options.bottle.is_dir():
            makers.append(("bottle", lambda work: bottle_cases(work, options.bottle)))
        for name, make in makers:
            work = Path(folder) / name
            work.mkdir()
            for case in make(work):
                if (options.only and case.command not in options.only) or (options.stages and case.stage not in options.stages):
                    continue
                for signum, repeat in ((signum, repeat) for signum in signals for repeat in range(options.repeat)):
                    scratch = work / "scratch" / f"{case.command}-{case.stage}-{signum.name}-{repeat}"
                    row = interrupt(case, signum, scratch)
                    rows.append(row)
                    print(f"  {row['data']} {row['command']} {row['stage']} {row['signal']}: "
                          f"{row['note'] or format(row['seconds'], '.2f') + ' s'}, status {row['status']}, "
                          f"load {load()}", flush=True)
    print()
    print_table(rows)
    print(f"\nload average at end: {load()}")


if __name__ == "__main__":
    main()
