"""``patchcore watch`` beside ``patchcore predict`` on the same photos, in one run (prints figures; not a test).

    python benchmarks/bench_watch.py                  # 60 bottle test photos, a model of today's defaults
    python benchmarks/bench_watch.py --photos 30 --paced 10 --repeats 1

One model (MVTec bottle, first ``--train`` training images, 1% bank, threshold calibrated on 10
good test photos) scores the same ``--photos`` test photos (900x900 PNG) these ways, each command
in a fresh process, predict and watch alternated ``--repeats`` times, overlays written as both
commands write them by default:

- ``predict``: ``patchcore predict MODEL PHOTOS -o OUT`` (its own printed time: scoring and
  writing, without start-up and model loading);
- ``watch, burst``: ``patchcore watch`` running; every photo copied into the inbox at once, each
  the way a camera delivers (written under a ``.part`` name, then renamed in). Throughput: photos
  over the time from the first landing to the last verdict committed; latency: from each photo's
  landing to its verdict committed (the row's time), so it includes waiting behind the others;
- ``watch, paced``: ``--paced`` photos more, each landing once the previous verdict is in: the
  latency of a photo that finds the station idle;
- the database: the commit time per verdict in watch's writer thread (from its summary), and
  SQLite commits measured alone: one verdict per commit (a station taking photos one by one)
  and 16 per commit (a backlog).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"
SAFETY_SECONDS = 600


class Child:
    """A ``patchcore`` command in a child process; threads collect its output lines."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "patchcore.cli", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines = {"stdout": [], "stderr": []}
        self._grew = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.lines]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str) -> None:
        for line in getattr(self.process, name):
            with self._grew:
                self.lines[name].append(line.rstrip("\n"))
                self._grew.notify_all()
        with self._grew:
            self._grew.notify_all()

    def wait_for(self, name: str, condition) -> None:
        with self._grew:
            done = self._grew.wait_for(lambda: condition(self.lines[name]) or self.process.poll() is not None,
                                       SAFETY_SECONDS)
        if not (done and condition(self.lines[name])):
            raise RuntimeError(f"the command ended or hung: {self.lines}")

    def finish(self, signum: int | None = None) -> int:
        if signum is not None:
            self.process.send_signal(signum)
        status = self.process.wait(SAFETY_SECONDS)
        for reader in self._readers:
            reader.join(SAFETY_SECONDS)
        return status


def fit_model(folder: Path, n_train: int) -> Path:
    from patchcore import PatchCore

    train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:n_train]
    calibration = sorted((BOTTLE / "test" / "good").glob("*.png"))[-10:]
    model = PatchCore(coreset_ratio=0.01).fit(train)
    model.calibrate_threshold(calibration)
    model.save(folder)
    return folder


def test_photos(n: int) -> list[Path]:
    photos = sorted((BOTTLE / "test").glob("*/*.png"))
    return (photos * (n // len(photos) + 1))[:n]


def land(photo: Path, inbox: Path, name: str) -> float:
    """Copy ``photo`` into ``inbox`` as a camera does; the wall-clock time it landed."""
    partial = inbox / f"{name}.part"
    shutil.copyfile(photo, partial)
    os.rename(partial, inbox / name)
    return time.time()


def run_predict(model: Path, photos: list[Path], out: Path) -> dict:
    child = Child("predict", str(model), *map(str, photos), "-o", str(out))
    if child.finish() != 0:
        raise RuntimeError(f"predict failed: {child.lines['stderr'][-5:]}")
    line = next(line for line in child.lines["stdout"] if " images in " in line)
    count, seconds = re.search(r"(\d+) images in ([\d.]+) s", line).groups()
    return {"photos": int(count), "seconds": float(seconds), "line": line}


def run_watch(model: Path, photos: list[Path], paced: int, root: Path) -> dict:
    from patchcore.station.history import History

    inbox, out = root / "inbox", root / "out"
    inbox.mkdir(parents=True)
    child = Child("watch", str(model), str(inbox), "-o", str(out))
    child.wait_for("stderr", lambda lines: any(line.startswith("watching") for line in lines))

    def verdicts(lines: list[str]) -> int:
        return sum(1 for line in lines if str(inbox) in line)

    landed: dict[str, float] = {}
    for i, photo in enumerate(photos):  # a burst: every photo at once
        name = f"burst_{i:03d}_{photo.parent.name}_{photo.name}"
        landed[str(inbox / name)] = land(photo, inbox, name)
    child.wait_for("stdout", lambda lines: verdicts(lines) >= len(photos))
    for i, photo in enumerate(photos[:paced]):  # paced: each photo finds the station idle
        name = f"paced_{i:03d}_{photo.parent.name}_{photo.name}"
        landed[str(inbox / name)] = land(photo, inbox, name)
        child.wait_for("stdout", lambda lines, target=len(photos) + i + 1: verdicts(lines) >= target)
    status = child.finish(signal.SIGINT)
    if status != 130:
        raise RuntimeError(f"watch ended with {status}: {child.lines['stderr'][-5:]}")
    summary = next(line for line in child.lines["stdout"] if line.startswith("watched"))
    with History(out / "history.db") as history:
        rows = history.inspections(limit=None)
    committed = {row.photo_path: row.at.timestamp() for row in rows}
    burst = [path for path in landed if "/burst_" in path]
    paced_paths = [path for path in landed if "/paced_" in path]
    return {
        "burst_seconds": max(committed[p] for p in burst) - min(landed[p] for p in burst),
        "burst_latencies": [committed[p] - landed[p] for p in burst],
        "paced_latencies": [committed[p] - landed[p] for p in paced_paths],
        "database_ms": float(re.search(r"database ([\d.]+) ms per photo", summary).group(1)),
        "busy_ms": float(re.search(r"; (\d+) ms per photo with reading", summary).group(1)),
        "summary": summary,
        "rows": len(rows),
    }


def sqlite_commits(folder: Path, count: int, group: int) -> float:
    """Milliseconds per verdict committed to a SQLite history, ``group`` verdicts per commit."""
    from patchcore.station.history import History
    from patchcore.station.schema import Inspection

    with History(folder / f"commits-{group}.db") as history:
        started = time.perf_counter()
        for start in range(0, count, group):
            history.record([Inspection(
                source="watch", photo_path=f"/inbox/photo_{i:05d}.png", photo_sha256=f"{i:064x}", model_name="bottle",
                model_version=1, model_sha256="0" * 64, score=1.0, verdict="ok", threshold=2.0,
                timings={"backbone": 40.0, "search": 5.0, "map": 3.0}, overlay_path=f"/out/overlays/photo_{i:05d}.png.png",
                at=dt.datetime.now(dt.timezone.utc)) for i in range(start, min(count, start + group))])
        return 1000.0 * (time.perf_counter() - started) / count


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=60, help="test photos scored by each command (default: 60)")
    parser.add_argument("--paced", type=int, default=20, help="photos landing one at a time (default: 20)")
    parser.add_argument("--train", type=int, default=60, help="training photos of the model (default: 60)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of predict and watch, alternated (default: 2)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    try:
        print(f"fitting on {args.train} bottle photos ...", flush=True)
        model = fit_model(root / "model", args.train)
        photos = test_photos(args.photos)
        runs = []
        for repeat in range(args.repeats):  # alternated, so that a busy spell of the machine hits both
            predicted = run_predict(model, photos, root / f"predict-out-{repeat}")
            watched = run_watch(model, photos, args.paced, root / f"watch-{repeat}")
            print(predicted["line"], watched["summary"], sep="\n", flush=True)
            runs.append((predicted, watched))
        one, sixteen = sqlite_commits(root, 300, 1), sqlite_commits(root, 320, 16)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = args.photos
    print()
    print(f"| {n} bottle photos (900x900 PNG), overlays written | images/s | latency median (ms) | latency p95 (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for repeat, (predicted, watched) in enumerate(runs, 1):
        burst, paced = watched["burst_latencies"], watched["paced_latencies"]
        print(f"| run {repeat}: `patchcore predict` (its own time: scoring and writing) | {n / predicted['seconds']:.2f} | "
              f"{1000 * predicted['seconds'] / n:.0f} (per photo) | |")
        print(f"| run {repeat}: `patchcore watch`, all {n} landing at once (first landing to last verdict committed) | "
              f"{n / watched['burst_seconds']:.2f} | {1000 * statistics.median(burst):.0f} | "
              f"{1000 * quantile(burst, 0.95):.0f} |")
        print(f"| run {repeat}: `patchcore watch`, {len(paced)} landing one at a time (landing to verdict committed) | | "
              f"{1000 * statistics.median(paced):.0f} | {1000 * quantile(paced, 0.95):.0f} |")
    print()
    print("| SQLite history (WAL, synchronous=FULL) | ms per verdict |")
    print("| --- | ---: |")
    for repeat, (_, watched) in enumerate(runs, 1):
        print(f"| run {repeat}: commit time in `watch`'s writer thread ({watched['rows']} verdicts) | "
              f"{watched['database_ms']:.1f} |")
    print(f"| alone, one verdict per commit | {one:.1f} |")
    print(f"| alone, 16 verdicts per commit | {sixteen:.2f} |")


if __name__ == "__main__":
    main()
