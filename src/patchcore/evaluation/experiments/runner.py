"""Running an experiment: every cell not yet done, resumable, with its tables and plot rewritten."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from ...errors import WeightsUnavailableError
from ..datasets import Dataset, load_mvtec_category, mvtec_categories
from ..evaluate import evaluate_dataset, log, resolve_root
from ..summary import percent
from .specs import ExperimentOptions, Spec, build_spec
from .store import append_cell, cell_key, is_done, read_cells, same_settings
from .tables import METRIC_COLUMNS, markdown_page, table_rows, write_csv

#: Result keys kept for every cell besides :data:`METRIC_COLUMNS`.
_EXTRA_KEYS = ("pixel_eval_size", "n_train", "feature_dim", "fit_timings", "defect_image_auroc",
               "ms_backbone", "ms_search", "ms_map", "feature_matrix_mib", "bank_mib")


def _row(cell: dict, result: dict, model, extras: dict) -> dict:
    row = {"cell": cell, **{key: result.get(key) for key in (*METRIC_COLUMNS, *_EXTRA_KEYS)}, **extras}
    row["index_description"] = getattr(getattr(model, "index_", None), "description", None)
    return row


def run_cell(spec: Spec, cell: dict, dataset: Dataset, eval_size: int | None) -> dict:
    """Build, fit and evaluate one cell's model; a backbone without weights is a skipped cell."""
    try:
        model = spec.make_model(cell)
        data = spec.dataset_for(cell, dataset) if spec.dataset_for else dataset
        if spec.fit is None:
            return _row(cell, evaluate_dataset(model, data, None, eval_size), model, {})
        started = time.perf_counter()
        extras = spec.fit(model, data.train)
        fit_seconds = time.perf_counter() - started
        result = evaluate_dataset(model, data, None, eval_size, fit=False)
        result["fit_seconds"] = fit_seconds
        return _row(cell, result, model, extras)
    except WeightsUnavailableError as error:
        return {"cell": cell, "skipped": f"weights unavailable: {error}"}


def run_cells(spec: Spec, dataset: Dataset, output: Path, eval_size: int | None, progress: bool = True) -> tuple[list[dict], int]:
    """Evaluate every cell not yet in ``output/cells.jsonl``; returns (all rows in cell order, cells computed)."""
    output.mkdir(parents=True, exist_ok=True)
    cells_path = output / "cells.jsonl"
    done = read_cells(cells_path)
    computed = 0
    for number, cell in enumerate(spec.cells, 1):
        label = ", ".join(f"{k}={v}" for k, v in cell.items())
        prefix = f"[{spec.name} {number}/{len(spec.cells)}] {label}"
        if is_done(done.get(cell_key(cell)), spec.settings):
            if progress:
                log(f"{prefix}: done before, skipped")
            continue
        if progress:
            log(f"{prefix}: running")
        started = time.perf_counter()
        row = run_cell(spec, cell, dataset, eval_size)
        row["seconds"] = time.perf_counter() - started
        if spec.settings is not None:
            row["settings"] = spec.settings
        append_cell(cells_path, row)
        done[cell_key(cell)] = row
        computed += 1
        if progress:
            log(f"{prefix}: " + (f"skipped ({row['skipped']})" if "skipped" in row else
                                 f"image AUROC {percent(row['image_auroc'])}, pixel AUROC {percent(row['pixel_auroc'])}, "
                                 f"AUPRO {percent(row['aupro'])} ({row['seconds']:.1f}s)"))
        write_outputs(spec, _ordered(spec, done), output, eval_size)
    rows = _ordered(spec, done)
    write_outputs(spec, rows, output, eval_size)
    return rows, computed


def _ordered(spec: Spec, done: dict[str, dict]) -> list[dict]:
    """This run's cells in order, then other cells of earlier runs into the same folder (same model settings)."""
    keys = [cell_key(c) for c in spec.cells]
    rows = [done[key] for key in keys if key in done]
    return rows + [row for key, row in done.items()
                   if key not in set(keys) and same_settings(row.get("settings"), spec.settings)]


def write_outputs(spec: Spec, rows: list[dict], output: Path, eval_size: int | None) -> None:
    """``results.csv``, ``results.md`` and ``<experiment>.png``."""
    write_csv(rows, output / "results.csv")
    header, lines = table_rows(spec.name, spec.columns, rows)
    (output / "results.md").write_text(markdown_page(spec.name, spec.notes, header, lines, eval_size))
    if rows:
        try:
            spec.plot(rows, output / f"{spec.name}.png")
        except Exception as error:  # a plot must never lose the results
            log(f"warning: could not draw the plot: {type(error).__name__}: {error}")


def run_experiment(name: str, root, category: str | None, output, options: ExperimentOptions, base: dict,
                   eval_size: int | None = 256, progress: bool = True, command: str | None = None) -> tuple[list[dict], int]:
    """Run experiment ``name`` on one category; returns (rows, cells computed in this run)."""
    root, categories = resolve_root(root, [category] if category else None)
    if not categories:
        categories = mvtec_categories(root)[:1]
    dataset = load_mvtec_category(root, categories[0])
    spec = build_spec(name, options, base)
    spec.settings = json.loads(json.dumps(base, default=str))
    output = Path(output)
    started = time.perf_counter()
    rows, computed = run_cells(spec, dataset, output, eval_size, progress)
    meta = {"experiment": name, "category": dataset.name, "eval_size": eval_size, "base_settings": base,
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
            "seconds_this_run": time.perf_counter() - started, "cells_computed_this_run": computed,
            "command": command or " ".join(sys.argv)}
    (output / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return rows, computed
