"""One model per folder of good images (a product line or camera each), fitted as Ray tasks.

The output folder holds one model directory per input folder: what ``patchcore serve`` serves.
A folder that fails is reported with its error; the others finish. Without Ray the folders are
fitted one after another, in this process.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from ..engine.cpus import available_cpus
from ..engine.images import IMAGE_SUFFIXES
from .ray_runtime import connect


def model_folders(root: str | os.PathLike) -> list[Path]:
    """The sub-folders of ``root`` that hold images directly (one model each), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    folders = [folder for folder in sorted(root.iterdir())
               if folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())]
    if not folders:
        raise ValueError(f"{root}: no sub-folders with images (one folder of good images per model)")
    return folders


def fit_one(folder: str, output: str, settings: dict[str, Any], threads: int | None) -> dict:
    """Fit and save one model; returns its summary, or the error that stopped it."""
    started = time.perf_counter()
    try:
        from ..engine.model import PatchCore

        model = PatchCore(**{**settings, **({"threads": threads} if threads else {})}).fit(folder)
        model.save(output, event={"action": "fit", "who": "fit-many"})
        return {"folder": folder, "model": output, "ok": True, "images": model.n_training_images_,
                "bank": int(model.memory_bank_.shape[0]), "seconds": time.perf_counter() - started}
    except Exception as error:  # one folder's failure must not stop the others
        return {"folder": folder, "model": output, "ok": False, "seconds": time.perf_counter() - started,
                "error": f"{type(error).__name__}: {error}",
                "trace": "".join(traceback.format_exception_only(type(error), error)).strip()}


def fit_many(root: str | os.PathLike, output: str | os.PathLike, settings: dict[str, Any] | None = None,
             ray: bool = False, address: str | None = None, cpus_per_task: int = 1, progress: bool = True) -> list[dict]:
    """Fit one model per image folder under ``root`` into ``output/<folder name>``.

    With ``ray``, each folder is a Ray task with ``cpus_per_task`` cores, on a local Ray or the
    cluster at ``address``; without, they run one by one here. Returns one summary per folder.
    """
    folders = model_folders(root)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), str(output / folder.name)) for folder in folders]
    settings = dict(settings or {})
    if not ray:
        results = []
        for folder, target in jobs:
            results.append(fit_one(folder, target, settings, None))
            if progress:
                _report(results[-1])
        return results
    ray_module = connect(address, None if address else max(cpus_per_task, available_cpus()))
    task = ray_module.remote(num_cpus=cpus_per_task)(fit_one)
    pending = {task.remote(folder, target, settings, cpus_per_task): folder for folder, target in jobs}
    results = []
    while pending:
        ready, _ = ray_module.wait(list(pending), num_returns=1)
        for reference in ready:
            folder = pending.pop(reference)
            try:
                result = ray_module.get(reference)
            except Exception as error:  # the worker itself died: still one folder's failure
                result = {"folder": folder, "ok": False, "error": f"{type(error).__name__}: {error}"}
            results.append(result)
            if progress:
                _report(result)
    return sorted(results, key=lambda r: r["folder"])


def _report(result: dict) -> None:
    if result["ok"]:
        print(f"fitted {result['folder']} -> {result['model']} ({result['images']} images, bank {result['bank']}, "
              f"{result['seconds']:.1f} s)", flush=True)
    else:
        print(f"error: {result['folder']} failed: {result['error']}", flush=True)
