"""The paper's experiments, one command each: ``patchcore experiment {coreset,layers,backbones,speed,shots}``.

Each experiment is a list of *cells* (one setting each: a coreset ratio and sampler, a layer set,
a backbone, a number of shots and a seed...). Every cell fits a model on ``train/good`` of one
MVTec-style category and evaluates it with :func:`patchcore.evaluate.evaluate_dataset`. A finished
cell is appended as one JSON line to ``OUT/cells.jsonl`` (keyed by its parameters); a rerun skips
those cells, so an interrupted run resumes. After each cell ``OUT/results.csv``, ``OUT/results.md``
and ``OUT/<experiment>.png`` are rewritten; the table is printed at the end.

This module must not import :mod:`patchcore.cli` at module level (cli imports it).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .baselines import METHODS, create_detector
from .coreset import coreset_size, greedy_coreset
from .datasets import Dataset, load_mvtec_category
from .errors import WeightsUnavailableError
from .ensemble import PatchCoreEnsemble
from .evaluate import evaluate_dataset, resolve_root
from .geometry import parse_resize
from .model import PatchCore
from .search import MemoryBankIndex

EXPERIMENTS = ("coreset", "layers", "backbones", "speed", "shots", "resolution")
GEOMETRIES = ("whole", "crop", "tiled")
SUBSAMPLINGS = ("greedy", "random")
INDEXES = ("exact", "hnsw", "ivfpq")
#: Coverage radius (largest distance of a training patch to the bank) is measured for a cell
#: only when training patches x bank size is at most this (it is an exact search of every patch).
COVERAGE_LIMIT = 5e8


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- PatchCore with the experiments' extra settings -------------------------------------------


class ExperimentPatchCore(PatchCore):
    """PatchCore plus the settings the experiments vary; PatchCore's own API is unchanged.

    subsampling: ``"greedy"`` (PatchCore's coreset) or ``"random"`` (the same number of patches
        drawn uniformly with ``seed``, the paper's "random subsampling" baseline).
    index: ``"exact"`` (PatchCore's :class:`~patchcore.search.MemoryBankIndex`), or ``"hnsw"`` /
        ``"ivfpq"`` (:class:`~patchcore.approximate_search.ApproximateIndex`).
    measure_coverage: also compute ``coverage_radius_`` (largest distance of a training patch to
        its nearest bank vector), when cheap enough (see :data:`COVERAGE_LIMIT`).

    Every setting round-trips through ``get_params`` and therefore ``save`` / ``load``. After
    ``predict`` the per-image stage times are summed in ``predict_timings_`` (with ``n_predicted_``).
    """

    def __init__(self, *args, subsampling: str = "greedy", index: str = "exact", measure_coverage: bool = False,
                 **settings) -> None:
        super().__init__(*args, **settings)
        self.subsampling = subsampling
        self.index = index
        self.measure_coverage = measure_coverage

    def get_params(self) -> dict[str, Any]:
        code = PatchCore.__init__.__code__
        names = code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount]
        params = {name: getattr(self, name) for name in names}
        params["layers"] = list(params["layers"]) if params["layers"] is not None else None
        params["weights"] = str(params["weights"])
        params.update(subsampling=self.subsampling, index=self.index, measure_coverage=self.measure_coverage)
        return params

    def __repr__(self) -> str:
        return (f"ExperimentPatchCore(backbone={self.backbone!r}, coreset_ratio={self.coreset_ratio}, "
                f"subsampling={self.subsampling!r}, index={self.index!r})")

    def fit(self, images, on_error=None) -> "ExperimentPatchCore":
        if self.subsampling not in SUBSAMPLINGS:
            raise ValueError(f"subsampling must be one of {', '.join(SUBSAMPLINGS)}, got {self.subsampling!r}")
        if self.index not in INDEXES:
            raise ValueError(f"index must be one of {', '.join(INDEXES)}, got {self.index!r}")
        ratio = self.coreset_ratio
        coreset_size(1, ratio)  # validate before the slow part
        self.predict_timings_ = {}
        self.n_predicted_ = 0
        if self.subsampling == "greedy" and not self.measure_coverage:
            return super().fit(images, on_error)
        # Keep every patch, then subsample here (greedy or random) so that the coverage of the
        # chosen bank can be measured against all training patches.
        self.coreset_ratio = 1.0
        index = self.index
        self.index = "exact"
        try:
            super().fit(images, on_error)
        finally:
            self.coreset_ratio = ratio
            self.index = index
        features = self.memory_bank_
        started = time.perf_counter()
        if self.subsampling == "greedy":
            kept = greedy_coreset(features, ratio, self.projection_dim, self.seed, self.progress)
        else:
            rng = np.random.default_rng(self.seed)
            kept = rng.choice(features.shape[0], size=coreset_size(features.shape[0], ratio), replace=False)
        kept = np.sort(kept)
        self.fit_timings_["coreset"] = time.perf_counter() - started
        if self.measure_coverage and features.shape[0] * len(kept) <= COVERAGE_LIMIT:
            bank_index = MemoryBankIndex(features[kept])
            self.coverage_radius_ = max(float(bank_index.search(features[s : s + 8192], 1)[0].max())
                                        for s in range(0, features.shape[0], 8192))
        started = time.perf_counter()
        self._set_memory_bank(features[kept])
        self.fit_timings_["index"] = time.perf_counter() - started
        return self

    def _set_memory_bank(self, memory_bank: np.ndarray) -> None:
        if getattr(self, "index", "exact") in (None, "exact"):
            return super()._set_memory_bank(memory_bank)
        from .approximate_search import ApproximateIndex

        self.memory_bank_ = np.ascontiguousarray(memory_bank, dtype=np.float32)
        self.index_ = ApproximateIndex(self.memory_bank_, self.index, seed=self.seed)

    def iter_predict(self, images, maps=True, on_error=None):
        totals = self.__dict__.setdefault("predict_timings_", {})
        for prediction in super().iter_predict(images, maps, on_error):
            for key, value in prediction.timings.items():
                totals[key] = totals.get(key, 0.0) + value
            self.n_predicted_ = getattr(self, "n_predicted_", 0) + 1
            yield prediction


class _TimedDetector:
    """Wraps a baseline so that its per-image stage times are summed as ExperimentPatchCore's are."""

    def __init__(self, detector) -> None:
        self._detector = detector
        self.predict_timings_: dict[str, float] = {}
        self.n_predicted_ = 0

    def __getattr__(self, name):
        return getattr(self._detector, name)

    def fit(self, images, on_error=None):
        self._detector.fit(images, on_error)
        return self

    def iter_predict(self, images, maps=True, on_error=None):
        for prediction in self._detector.iter_predict(images, maps, on_error):
            for key, value in prediction.timings.items():
                self.predict_timings_[key] = self.predict_timings_.get(key, 0.0) + value
            self.n_predicted_ += 1
            yield prediction


# -- cells, resume, outputs -------------------------------------------------------------------


def cell_key(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True)


def read_cells(path: Path) -> dict[str, dict]:
    """Finished cells of ``cells.jsonl`` by key (a truncated last line, from an interrupted run, is ignored)."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[cell_key(row["cell"])] = row
    return done


@dataclasses.dataclass
class Spec:
    """One experiment: its cells, how to build each cell's model, its table columns and plot."""

    name: str
    cells: list[dict]
    make_model: Callable[[dict], Any]
    columns: list[str]  # cell keys shown first in the table
    plot: Callable[[list[dict], Path], None]
    dataset_for: Callable[[dict, Dataset], Dataset] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    #: The model settings shared by every cell: a stored cell made with other settings is recomputed.
    settings: dict | None = None


METRIC_COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "fit_seconds", "ms_per_image", "memory_bank_size")


def _result_row(cell: dict, result: dict, model) -> dict:
    row = {"cell": cell, **{key: result.get(key) for key in (*METRIC_COLUMNS, "pixel_eval_size", "n_train", "feature_dim")}}
    row["fit_timings"] = result.get("fit_timings")
    row["defect_image_auroc"] = result.get("defect_image_auroc")
    n = max(getattr(model, "n_predicted_", 0), 1)
    for key, value in getattr(model, "predict_timings_", {}).items():
        row[f"ms_{key}"] = 1000.0 * value / n
    coverage = getattr(model, "coverage_radius_", None)
    row["coverage_radius"] = coverage
    index = getattr(model, "index_", None)
    row["index_description"] = getattr(index, "description", None)
    return row


def run_cells(spec: Spec, dataset: Dataset, output: Path, eval_size: int | None, progress: bool = True) -> tuple[list[dict], int]:
    """Evaluate every cell not yet in ``output/cells.jsonl``; returns (all rows in cell order, cells computed)."""
    output.mkdir(parents=True, exist_ok=True)
    cells_path = output / "cells.jsonl"
    done = read_cells(cells_path)
    computed = 0
    for number, cell in enumerate(spec.cells, 1):
        key = cell_key(cell)
        label = ", ".join(f"{k}={v}" for k, v in cell.items())
        # A cell skipped for want of weights is tried again: the weights may be installed by now.
        if key in done and "skipped" not in done[key] and _same_settings(done[key].get("settings"), spec.settings):
            if progress:
                _log(f"[{spec.name} {number}/{len(spec.cells)}] {label}: done before, skipped")
            continue
        if progress:
            _log(f"[{spec.name} {number}/{len(spec.cells)}] {label}: running")
        started = time.perf_counter()
        try:
            model = spec.make_model(cell)
            data = spec.dataset_for(cell, dataset) if spec.dataset_for else dataset
            result = evaluate_dataset(model, data, None, eval_size)
            row = _result_row(cell, result, model)
        except WeightsUnavailableError as error:
            row = {"cell": cell, "skipped": f"weights unavailable: {error}"}
        row["seconds"] = time.perf_counter() - started
        if spec.settings is not None:
            row["settings"] = spec.settings
        with open(cells_path, "a") as handle:
            handle.write(json.dumps(row, default=float) + "\n")
        done[key] = row
        computed += 1
        if progress:
            _log(f"[{spec.name} {number}/{len(spec.cells)}] {label}: " + (
                f"skipped ({row['skipped']})" if "skipped" in row else
                f"image AUROC {_pct(row['image_auroc'])}, pixel AUROC {_pct(row['pixel_auroc'])}, "
                f"AUPRO {_pct(row['aupro'])} ({row['seconds']:.1f}s)"))
        write_outputs(spec, _ordered(spec, done), output, eval_size)
    rows = _ordered(spec, done)
    write_outputs(spec, rows, output, eval_size)
    return rows, computed


def _same_settings(stored: dict | None, current: dict | None) -> bool:
    """A stored cell counts as done unless both it and this run name settings and they differ."""
    if stored is None or current is None:
        return True
    return json.dumps(stored, sort_keys=True, default=str) == json.dumps(current, sort_keys=True, default=str)


def _ordered(spec: Spec, done: dict[str, dict]) -> list[dict]:
    """This run's cells in order, then other cells of earlier runs into the same folder (same model settings)."""
    keys = [cell_key(c) for c in spec.cells]
    rows = [done[key] for key in keys if key in done]
    return rows + [row for key, row in done.items()
                   if key not in set(keys) and _same_settings(row.get("settings"), spec.settings)]


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(spec: Spec, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the results table (AUROC/AUPRO in percent)."""
    if spec.name == "shots":
        return _shots_table(rows)
    extra = ["ms backbone", "ms search", "ms map"] if spec.name == "speed" else []
    coverage = spec.name == "coreset"
    header = [*spec.columns, "image AUROC", "pixel AUROC", "AUPRO", "fit s", "bank size", "ms/img", *extra]
    if coverage:
        header.append("coverage radius")
    lines = []
    for row in rows:
        cell = [str(row["cell"].get(c, "")) for c in spec.columns]
        if "skipped" in row:
            lines.append(cell + [f"skipped: {row['skipped']}"])
            continue
        line = cell + [_pct(row["image_auroc"]), _pct(row["pixel_auroc"]), _pct(row["aupro"]),
                       _num(row["fit_seconds"], ".1f"), _num(row["memory_bank_size"], "d"), _num(row["ms_per_image"], ".1f")]
        line += [_num(row.get(f"ms_{k}"), ".1f") for k in ("backbone", "search", "map")] if extra else []
        if coverage:
            line.append(_num(row.get("coverage_radius"), ".3f"))
        lines.append(line)
    return header, lines


def shots_summary(rows: list[dict]) -> list[dict]:
    """Per number of shots: mean and standard deviation over seeds."""
    summary = []
    for shots in sorted({row["cell"]["shots"] for row in rows if "skipped" not in row}):
        group = [row for row in rows if row["cell"]["shots"] == shots and "skipped" not in row]
        entry = {"shots": shots, "seeds": len(group)}
        for key in ("image_auroc", "pixel_auroc", "aupro", "fit_seconds"):
            values = [row[key] for row in group if row.get(key) is not None]
            entry[f"{key}_mean"] = float(np.mean(values)) if values else None
            entry[f"{key}_std"] = float(np.std(values)) if values else None
        summary.append(entry)
    return summary


def _shots_table(rows: list[dict]):
    header = ["shots", "seeds", "image AUROC", "pixel AUROC", "AUPRO", "fit s"]
    lines = []
    for s in shots_summary(rows):
        pm = lambda key: "-" if s[f"{key}_mean"] is None else f"{100 * s[f'{key}_mean']:.1f} ± {100 * s[f'{key}_std']:.1f}"  # noqa: E731
        lines.append([str(s["shots"]), str(s["seeds"]), pm("image_auroc"), pm("pixel_auroc"), pm("aupro"),
                      _num(s["fit_seconds_mean"], ".1f")])
    return header, lines


def format_text_table(header: list[str], lines: list[list[str]]) -> str:
    """Right-aligned columns; a shorter line (a skipped cell) ends with its message, outside the columns."""
    full = [line for line in lines if len(line) == len(header)]
    widths = [max([len(h)] + [len(line[i]) for line in full]) for i, h in enumerate(header)]

    def render(cells):
        if len(cells) < len(header):
            return "  ".join(f"{c:>{w}}" for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]
        return "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))

    return "\n".join([render(header), "-" * len(render(header)), *(render(line) for line in lines)])


def format_markdown(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    out += ["| " + " | ".join(line + [""] * (len(header) - len(line))) + " |" for line in lines]
    return "\n".join(out)


def write_outputs(spec: Spec, rows: list[dict], output: Path, eval_size: int | None) -> None:
    """``results.csv`` (one line per cell, every measured value), ``results.md`` and the plot."""
    flat = []
    for row in rows:
        entry = dict(row["cell"])
        entry.update({k: v for k, v in row.items() if k not in ("cell", "fit_timings", "settings")})
        for key, value in (row.get("fit_timings") or {}).items():
            entry[f"fit_{key}_s"] = value
        flat.append(entry)
    fields: list[str] = []
    for entry in flat:
        fields += [k for k in entry if k not in fields]
    tmp = output / "results.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for entry in flat:
            writer.writerow({k: ("" if entry.get(k) is None else entry.get(k)) for k in fields})
    tmp.replace(output / "results.csv")
    header, lines = table_rows(spec, rows)
    pixel = "full resolution" if eval_size is None else f"{eval_size} x {eval_size} (maps and masks resized)"
    text = [f"# Experiment: {spec.name}", "", *spec.notes,
            f"Pixel AUROC and AUPRO computed at {pixel}. AUROC/AUPRO in percent; ms/img is the whole "
            "per-image inference time (backbone + search + map).", "", format_markdown(header, lines), ""]
    (output / "results.md").write_text("\n".join(text))
    if rows:
        try:
            spec.plot(rows, output / f"{spec.name}.png")
        except Exception as error:  # a plot must never lose the results
            _log(f"warning: could not draw the plot: {type(error).__name__}: {error}")


# -- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows):
    return [row for row in rows if "skipped" not in row]


def _plot_coreset(rows, path):
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    for sampler, style in (("greedy", "o-"), ("random", "s--")):
        group = sorted((r for r in _ok(rows) if r["cell"]["subsampling"] == sampler), key=lambda r: r["cell"]["ratio"])
        if not group:
            continue
        x = [100 * r["cell"]["ratio"] for r in group]
        axes[0].plot(x, [100 * r["image_auroc"] for r in group], style, label=f"{sampler} image AUROC")
        if group[0]["pixel_auroc"] is not None:
            axes[0].plot(x, [100 * r["pixel_auroc"] for r in group], style, alpha=0.5, label=f"{sampler} pixel AUROC")
        axes[1].plot(x, [r["ms_per_image"] for r in group], style, label=sampler)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("coreset ratio (%)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("AUROC (%)")
    axes[1].set_ylabel("ms per image")
    figure.suptitle("coreset: greedy vs random subsampling")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _plot_bars(title):
    def plot(rows, path):
        plt = _pyplot()
        ok = _ok(rows)
        labels = [" ".join(f"{v}" for v in r["cell"].values()) for r in ok]
        figure, axes = plt.subplots(figsize=(max(5, 0.9 * len(ok) + 2), 4), dpi=100)
        x = np.arange(len(ok))
        axes.bar(x - 0.2, [100 * (r["image_auroc"] or 0) for r in ok], 0.4, label="image AUROC")
        axes.bar(x + 0.2, [100 * (r["pixel_auroc"] or 0) for r in ok], 0.4, label="pixel AUROC")
        axes.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        low = min([100 * (r["image_auroc"] or 0) for r in ok] + [100 * (r["pixel_auroc"] or 0) for r in ok] + [100])
        axes.set_ylim(max(0, low - 5), 100.5)
        axes.set_ylabel("AUROC (%)")
        axes.set_title(title)
        axes.legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)

    return plot


def _plot_speed(rows, path):
    plt = _pyplot()
    ok = _ok(rows)
    labels = [f"{100 * r['cell']['ratio']:g}% {r['cell']['index']}" for r in ok]
    figure, axes = plt.subplots(figsize=(max(5, 0.9 * len(ok) + 2), 4), dpi=100)
    bottom = np.zeros(len(ok))
    for key in ("backbone", "search", "map"):
        values = np.array([r.get(f"ms_{key}") or 0.0 for r in ok])
        axes.bar(labels, values, bottom=bottom, label=key)
        bottom += values
    for i, r in enumerate(ok):
        axes.text(i, bottom[i], f"{_pct(r['image_auroc'])}", ha="center", va="bottom", fontsize=8)
    axes.set_ylabel("ms per image (label: image AUROC %)")
    axes.set_title("speed: per-image time split")
    axes.tick_params(axis="x", rotation=30, labelsize=8)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _plot_shots(rows, path):
    plt = _pyplot()
    summary = shots_summary(rows)
    figure, axes = plt.subplots(figsize=(5, 3.8), dpi=100)
    x = [s["shots"] for s in summary]
    for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        if all(s[f"{key}_mean"] is not None for s in summary):
            axes.errorbar(x, [100 * s[f"{key}_mean"] for s in summary], yerr=[100 * s[f"{key}_std"] for s in summary],
                          marker="o", capsize=3, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("training images (shots)")
    axes.set_ylabel("AUROC (%), mean ± std over seeds")
    axes.set_title("few-shot")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# -- the experiments --------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def stage_names(backbone: str) -> list[str]:
    """The backbone's feature stages after the stride-4 one (the candidates for PatchCore's layers)."""
    from .backbones import _feature_stages, resolve_spec

    spec = resolve_spec(backbone)
    return [s["module"] for s in _feature_stages(spec.architecture) if s["reduction"] >= 4]


def default_layer_sets(backbone: str) -> list[list[str]]:
    """Single stages, adjacent pairs and adjacent triples of the backbone's stride >= 4 stages."""
    stages = stage_names(backbone)
    sets = [[s] for s in stages]
    sets += [stages[i : i + 2] for i in range(len(stages) - 1)]
    sets += [stages[i : i + 3] for i in range(len(stages) - 2)]
    return sets


def build_spec(name: str, args: argparse.Namespace, base: dict) -> Spec:
    """The cells and the model factory of experiment ``name``; ``base`` = the model settings."""
    progress = dict(progress=False)

    def patchcore(**overrides):
        settings = {**base, **progress, **overrides}
        return ExperimentPatchCore(**settings)

    if name == "coreset":
        ratios = _floats(args.ratios)
        cells = [{"ratio": r, "subsampling": s} for r in ratios for s in SUBSAMPLINGS]
        return Spec(name, cells, lambda c: patchcore(coreset_ratio=c["ratio"], subsampling=c["subsampling"],
                                                      measure_coverage=True),
                    ["ratio", "subsampling"], _plot_coreset,
                    notes=["Greedy coreset vs random subsampling of the same size. coverage radius = largest distance "
                           "of a training patch to its nearest bank vector (lower is better; measured only where cheap).",
                           ""])
    if name == "layers":
        if args.layer_sets:
            layer_sets = [[x for x in group.split("+") if x] for group in args.layer_sets.split(",")]
        else:
            layer_sets = default_layer_sets(base["backbone"])
        cells = [{"layers": "+".join(ls), "p": 3} for ls in layer_sets]
        from .backbones import resolve_spec

        default_layers = "+".join(resolve_spec(base["backbone"], base.get("layers"), base.get("feature_location")).layers)
        for p in _ints(args.neighbourhoods):
            if {"layers": default_layers, "p": p} not in cells:
                cells.append({"layers": default_layers, "p": p})

        def make(c):
            return patchcore(layers=c["layers"].split("+"), neighbourhood=c["p"])
        return Spec(name, cells, make, ["layers", "p"], _plot_bars("layers and neighbourhood p"),
                    notes=[f"Backbone {base['backbone']}; p = neighbourhood size (tried with the default layers {default_layers}).", ""])
    if name == "backbones":
        cells = [{"backbone": b} for b in _names(args.backbones)]

        def make(c):
            if "+" not in c["backbone"]:
                return patchcore(backbone=c["backbone"])
            members = {key: value for key, value in base.items() if key not in ("backbone", "progress")}
            return _TimedDetector(PatchCoreEnsemble(c["backbone"].split("+"), members))

        return Spec(name, cells, make, ["backbone"], _plot_bars("backbones"),
                    notes=["Backbones whose weights are unavailable are listed as skipped. a+b+c = an ensemble: one "
                           "memory bank per backbone, patch scores standardised on each member's good training "
                           "patches, then averaged.", ""])
    if name == "resolution":
        cells = []
        for size in _names(args.sizes):
            resize = parse_resize(size)
            for geometry in _names(args.geometries):
                if geometry not in GEOMETRIES:
                    raise ValueError(f"unknown geometry {geometry!r}: use {', '.join(GEOMETRIES)}")
                if geometry == "crop" and not isinstance(resize, int):
                    continue  # a centre crop is defined relative to a shorter side
                if geometry == "tiled" and isinstance(resize, int) and resize <= args.tile:
                    continue  # the whole input fits in one tile: the same as "whole"
                cells.append({"resize": size, "geometry": geometry})

        def make(c):
            resize = parse_resize(c["resize"])
            if c["geometry"] == "crop":
                return patchcore(resize=resize, crop=int(round(resize * 224 / 256)), tile_size=None)
            if c["geometry"] == "tiled":
                return patchcore(resize=resize, crop=None, tile_size=args.tile, tile_overlap=args.tile_overlap_share)
            return patchcore(resize=resize, crop=None, tile_size=None)

        return Spec(name, cells, make, ["resize", "geometry"], _plot_bars("input size and geometry"),
                    notes=["resize = shorter side of the network input (none = the photo's own size). whole = the "
                           "whole photo, aspect ratio kept; crop = centred square of 224/256 of the shorter side (the "
                           f"paper's protocol at 256); tiled = whole photo cut into {args.tile} px tiles overlapping "
                           f"{args.tile_overlap_share:g} of a side, stitched. Pixel metrics over every pixel of the photo.", ""])
    if name == "speed":
        cells = [{"ratio": r, "index": i} for r in _floats(args.ratios) for i in _names(args.indexes)]
        for c in cells:
            if c["index"] not in INDEXES:
                raise ValueError(f"unknown index {c['index']!r}: use {', '.join(INDEXES)}")
        return Spec(name, cells, lambda c: patchcore(coreset_ratio=c["ratio"], index=c["index"]),
                    ["ratio", "index"], _plot_speed,
                    notes=["Per-image time split (ms): backbone forward pass (its share of the batch), "
                           "nearest-neighbour search with the eq. 7 re-weighting, anomaly map. exact = torch "
                           "MemoryBankIndex; hnsw = faiss HNSW; ivfpq = faiss IVF-PQ (as the paper).", ""])
    if name == "shots":
        cells = [{"shots": k, "seed": s} for k in _ints(args.shots) for s in range(args.seeds)]

        def dataset_for(cell, dataset):
            if cell["shots"] > len(dataset.train):
                raise ValueError(f"{cell['shots']} shots but only {len(dataset.train)} training images")
            rng = np.random.default_rng(cell["seed"])
            chosen = sorted(rng.choice(len(dataset.train), size=cell["shots"], replace=False))
            return dataclasses.replace(dataset, train=[dataset.train[i] for i in chosen])

        return Spec(name, cells, lambda c: patchcore(seed=c["seed"]), ["shots", "seed"], _plot_shots,
                    dataset_for=dataset_for,
                    notes=[f"k training images drawn at random (seed 0..{args.seeds - 1}) from train/good; mean ± std over seeds.", ""])
    if name == "methods":
        return build_methods_spec(args, base)
    raise ValueError(f"unknown experiment {name!r}: use one of {', '.join(EXPERIMENTS)}, methods")


def run_experiment(name: str, root, category: str | None, output, args: argparse.Namespace, base: dict,
                   eval_size: int | None = 256, progress: bool = True) -> tuple[list[dict], int]:
    """Run experiment ``name`` on one category; returns (rows, cells computed in this run)."""
    root, categories = resolve_root(root, [category] if category else None)
    if not categories:
        from .datasets import mvtec_categories

        categories = mvtec_categories(root)[:1]
        if not categories:
            raise ValueError(f"{root}: no MVTec categories")
    dataset = load_mvtec_category(root, categories[0])
    spec = build_spec(name, args, base)
    spec.settings = json.loads(json.dumps(base, default=str))
    output = Path(output)
    started = time.perf_counter()
    rows, computed = run_cells(spec, dataset, output, eval_size, progress)
    meta = {"experiment": name, "category": dataset.name, "eval_size": eval_size, "base_settings": base,
            "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} CPUs".strip(),
            "seconds_this_run": time.perf_counter() - started, "cells_computed_this_run": computed,
            "command": " ".join(sys.argv)}
    (output / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return rows, computed


# -- PatchCore vs the baselines (patchcore experiment methods) ----------------------------------


def build_methods_spec(args: argparse.Namespace, base: dict) -> Spec:
    cells = [{"method": m} for m in _names(args.methods)]
    for c in cells:
        if c["method"] not in METHODS:
            raise ValueError(f"unknown method {c['method']!r}: use {', '.join(METHODS)}")

    def make(c):
        if c["method"] == "patchcore":
            return ExperimentPatchCore(**{**base, "progress": False})
        return _TimedDetector(create_detector(c["method"], **{**base, "progress": False}))

    return Spec("methods", cells, make, ["method"], _plot_bars("PatchCore vs SPADE vs PaDiM"),
                notes=["Same backbone features for all three. bank size: PatchCore = coreset; SPADE = every training "
                       "patch; PaDiM = number of per-position Gaussians.", ""])


# -- command line ----------------------------------------------------------------------------


def add_experiment_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``patchcore experiment`` on ``subparsers``."""
    from .cli import add_model_options  # lazily: cli imports this module

    parser = subparsers.add_parser(
        "experiment",
        help="run one of the paper's experiments (coreset, layers, backbones, speed, shots, methods)",
        description="Run one of the paper's experiments on one MVTec-style category. Writes OUT/results.csv, "
                    "OUT/results.md, OUT/<experiment>.png; finished cells are kept in OUT/cells.jsonl and "
                    "skipped when the command is run again (resume).",
    )
    parser.add_argument("experiment", choices=(*EXPERIMENTS, "methods"))
    parser.add_argument("root", metavar="ROOT", help="MVTec AD root folder, or one category folder (with train/good)")
    parser.add_argument("--category", default=None, help="category under ROOT (default: the first one)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the results")
    parser.add_argument("--eval-size", type=int, default=256, metavar="N",
                        help="pixel metrics on maps and masks resized to N x N; 0 = full resolution (default: 256)")
    parser.add_argument("--ratios", default="0.001,0.01,0.1,0.25,1.0", help="coreset/speed: coreset ratios")
    parser.add_argument("--layer-sets", default=None,
                        help="layers: comma-separated sets, stages joined by '+', e.g. blocks.2,blocks.4,blocks.2+blocks.4 "
                             "(default: single stages, adjacent pairs and triples)")
    parser.add_argument("--neighbourhoods", default="1,3,5,7", help="layers: neighbourhood sizes p tried with the default layers")
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2", help="backbones: names")
    parser.add_argument("--indexes", default="exact,hnsw,ivfpq", help="speed: nearest-neighbour indexes")
    parser.add_argument("--shots", default="1,2,5,10,16,20,50", help="shots: numbers of training images")
    parser.add_argument("--seeds", type=int, default=3, help="shots: seeds per number of shots")
    parser.add_argument("--methods", default="patchcore,spade,padim", help="methods: detectors to compare")
    parser.add_argument("--sizes", default="224,256,320,384,448,none",
                        help="resolution: shorter sides of the network input ('none' = the photo's own size)")
    parser.add_argument("--geometries", default="whole,crop,tiled", help="resolution: whole, crop and/or tiled")
    parser.add_argument("--tile", type=int, default=256, help="resolution: tile side in pixels for 'tiled' (default: 256)")
    parser.add_argument("--tile-overlap-share", dest="tile_overlap_share", type=float, default=0.25,
                        help="resolution: share of a tile's side that neighbours overlap (default: 0.25)")
    add_model_options(parser)
    parser.set_defaults(handler=run_experiment_command)
    return parser


def run_experiment_command(args: argparse.Namespace) -> int:
    from .cli import model_from_args

    model = model_from_args(args)
    base = {key: value for key, value in PatchCore.get_params(model).items()} if isinstance(model, PatchCore) else None
    if base is None:
        raise ValueError("experiment: --method selects the detector of 'evaluate'; use 'experiment methods' to compare them")
    base["progress"] = False
    eval_size = args.eval_size or None
    rows, _ = run_experiment(args.experiment, args.root, args.category, args.output, args, base, eval_size)
    spec = build_spec(args.experiment, args, base)
    header, lines = table_rows(spec, rows)
    print(format_text_table(header, lines))
    print(f"wrote {Path(args.output) / 'results.csv'}, results.md and {spec.name}.png")
    return 0
