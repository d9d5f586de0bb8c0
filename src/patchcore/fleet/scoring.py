"""Scoring many images with Ray Data: an actor pool in which each actor loads the model once.

Results are appended to ``OUT/scores.csv`` (path, score, is_anomalous, error) as batches finish,
so a run that stops keeps what it did, and a rerun scores only the images not yet in the file.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

from ..engine.images import expand_sources
from .ray_runtime import connect

COLUMNS = ("path", "score", "is_anomalous", "error")


class Scorer:
    """A Ray Data actor: loads the model once, scores batches of image paths."""

    def __init__(self, model_dir: str, threads: int, overlays: str | None) -> None:
        from ..engine.loading import load_model

        self.model = load_model(model_dir, threads=threads)
        self.overlays = Path(overlays) if overlays else None

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        scores, verdicts, errors = [], [], []
        failed: dict[str, str] = {}
        predictions = {}
        for prediction in self.model.iter_predict(paths, maps=self.overlays is not None, keep_images=self.overlays is not None,
                                                  on_error=lambda error: failed.__setitem__(error.source, error.problem)):
            predictions[prediction.name] = prediction
            if self.overlays is not None:
                _write_overlay(self.model, prediction, self.overlays)
        for path in paths:
            prediction = predictions.get(path)
            scores.append(math.nan if prediction is None else float(prediction.score))
            verdicts.append("" if prediction is None or prediction.is_anomalous is None else int(prediction.is_anomalous))
            errors.append(failed.get(path, "" if prediction is not None else "not scored"))
        return {"path": paths, "score": scores, "is_anomalous": verdicts, "error": errors}


def _write_overlay(model, prediction, folder: Path) -> None:
    from ..engine.overlay import model_heat_scale, overlay_beside_photo, save_png

    folder.mkdir(parents=True, exist_ok=True)
    # Named after the whole path: workers on other machines write into one folder without collisions.
    name = prediction.name.strip("/").replace("/", "__") + ".png"
    save_png(overlay_beside_photo(prediction.image, prediction.anomaly_map, *model_heat_scale(model)), folder / name)


def done_paths(results: Path) -> set[str]:
    """Images already scored in an earlier run (their lines in ``scores.csv``)."""
    if not results.is_file():
        return set()
    with open(results, newline="") as handle:
        return {row["path"] for row in csv.DictReader(handle) if row.get("path")}


def predict_on_ray(model_dir: str | os.PathLike, inputs, output: str | os.PathLike, address: str | None = None,
                   workers: int = 2, cpus_per_worker: int = 1, batch_size: int = 16, overlays: bool = False,
                   progress: bool = True) -> dict:
    """Score ``inputs`` (image files or folders) with the model in ``model_dir`` on Ray.

    Without ``address`` a local Ray with ``workers * cpus_per_worker`` cores starts; with one, the
    run joins that cluster (``"auto"`` for the one this machine belongs to). Every worker loads the
    model once and runs its network on ``cpus_per_worker`` threads. Returns counts and timing.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    results = output / "scores.csv"
    paths = sorted({str(Path(p).resolve()) for p in expand_sources(list(inputs)) if isinstance(p, (str, os.PathLike))})
    done = done_paths(results)
    todo = [p for p in paths if p not in done]
    summary = {"images": len(paths), "already_scored": len(paths) - len(todo), "scored": 0, "failed": 0, "seconds": 0.0}
    if not todo:
        return summary
    ray = connect(address, None if address else workers * cpus_per_worker)
    started = time.perf_counter()
    dataset = ray.data.from_items([{"path": p} for p in todo])
    scored = dataset.map_batches(
        Scorer, fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()), "threads": cpus_per_worker,
                                       "overlays": str((output / "overlays").resolve()) if overlays else None},
        concurrency=workers, num_cpus=cpus_per_worker, batch_size=batch_size, batch_format="numpy",
    )
    fresh = not results.is_file()
    with open(results, "a", newline="") as handle:
        writer = csv.writer(handle)
        if fresh:
            writer.writerow(COLUMNS)
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for path, score, verdict, error in zip(batch["path"], batch["score"], batch["is_anomalous"], batch["error"]):
                writer.writerow([path, "" if math.isnan(score) else f"{score:.6f}", verdict, error])
                summary["scored" if not error else "failed"] += 1
            handle.flush()  # what is written stays written, also if the run stops here
            if progress:
                print(f"scored {summary['scored'] + summary['failed']} of {len(todo)}", flush=True)
    summary["seconds"] = time.perf_counter() - started
    return summary
