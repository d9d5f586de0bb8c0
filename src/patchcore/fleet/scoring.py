"""Scoring many images with Ray Data: an actor pool in which each actor loads the model once.

Results are appended to ``OUT/scores.csv`` (:mod:`patchcore.engine.scores_file`, the columns of
plain ``patchcore predict``) as batches finish, so a run that stops keeps what it did, and a rerun
scores only the images without a score in the file (failed ones again), refusing another model's file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..engine.images import expand_sources
from ..engine.persistence import model_sha256
from ..engine.scores_file import ScoresFile
from .ray_runtime import connect


class Scorer:
    """A Ray Data actor: loads the model once, scores batches of image paths.

    Each row carries the SHA-256 of the model this actor loaded: on a cluster every machine reads
    the model folder from its own disk, and the driver refuses rows of another version.
    """

    def __init__(self, model_dir: str, threads: int, overlays: str | None) -> None:
        from ..engine.loading import load_model

        self.model_sha256 = model_sha256(model_dir)
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
            scores.append(float("nan") if prediction is None else float(prediction.score))
            verdicts.append("" if prediction is None or prediction.is_anomalous is None else str(int(prediction.is_anomalous)))
            errors.append(failed.get(path, "" if prediction is not None else "not scored"))
        return {"path": paths, "score": scores, "is_anomalous": verdicts, "error": errors,
                "model_sha256": [self.model_sha256] * len(paths)}


def _write_overlay(model, prediction, folder: Path) -> None:
    from ..engine.overlay import model_heat_scale, overlay_beside_photo, save_png

    folder.mkdir(parents=True, exist_ok=True)
    # Named after the whole path: workers on other machines write into one folder without collisions.
    name = prediction.name.strip("/").replace("/", "__") + ".png"
    save_png(overlay_beside_photo(prediction.image, prediction.anomaly_map, *model_heat_scale(model)), folder / name)


def predict_on_ray(model_dir: str | os.PathLike, inputs, output: str | os.PathLike, address: str | None = None,
                   workers: int = 2, cpus_per_worker: int = 1, batch_size: int = 16, overlays: bool = False,
                   progress: bool = True) -> dict:
    """Score ``inputs`` (image files or folders) with the model in ``model_dir`` on Ray.

    Without ``address`` a local Ray with ``workers * cpus_per_worker`` cores starts; with one, the
    run joins that cluster (``"auto"`` for the one this machine belongs to). Every worker loads the
    model once and runs its network on ``cpus_per_worker`` threads. ``OUT/scores.csv`` is resumed
    (:meth:`~patchcore.engine.scores_file.ScoresFile.resume`). Returns counts and timing.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = sorted({str(Path(p).resolve()) for p in expand_sources(list(inputs)) if isinstance(p, (str, os.PathLike))})
    with ScoresFile.resume(output / "scores.csv", model_sha256(model_dir), retry=paths, model_name=str(model_dir)) as results:
        todo = [p for p in paths if p not in results.done]
        summary = {"images": len(paths), "already_scored": len(paths) - len(todo), "scored": 0, "failed": 0, "seconds": 0.0}
        if not todo:
            return summary
        batches = _scored_batches(model_dir, todo, output / "overlays" if overlays else None, address, workers,
                                  cpus_per_worker, batch_size)
        started = time.perf_counter()
        for batch in batches:
            _write_batch(results, batch, summary, model_dir)
            if progress:
                print(f"scored {summary['scored'] + summary['failed']} of {len(todo)}", flush=True)
        summary["seconds"] = time.perf_counter() - started
    return summary


def _scored_batches(model_dir, todo: list[str], overlays: Path | None, address: str | None, workers: int,
                    cpus_per_worker: int, batch_size: int):
    """Connect to Ray and return the scored batches of ``todo`` (Ray Data, computed as they are read)."""
    ray = connect(address, None if address else workers * cpus_per_worker)
    dataset = ray.data.from_items([{"path": p} for p in todo])
    scored = dataset.map_batches(
        Scorer, fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()), "threads": cpus_per_worker,
                                       "overlays": str(overlays.resolve()) if overlays else None},
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker, batch_size=batch_size, batch_format="numpy",
    )
    return scored.iter_batches(batch_size=None, batch_format="numpy")


def _write_batch(results: ScoresFile, batch: dict, summary: dict, model_dir) -> None:
    """Write a scored batch's rows to ``results``, counting them in ``summary``; refuse another model's rows."""
    for path, score, verdict, error, sha in zip(batch["path"], batch["score"], batch["is_anomalous"], batch["error"],
                                                batch["model_sha256"]):
        if sha != results.model_sha256:
            raise ValueError(f"{model_dir}: a Ray worker loaded model {sha}, not {results.model_sha256} as this run "
                             "did; the model changed during the run, or differs on that worker's machine")
        if error:
            results.add_failure(str(path), str(error))
            summary["failed"] += 1
        else:
            results.add(str(path), float(score), None if verdict == "" else verdict == "1")
            summary["scored"] += 1
