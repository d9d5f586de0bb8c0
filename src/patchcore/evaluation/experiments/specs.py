"""The paper's experiments (and ours), each as a list of cells and a way to build each cell's model.

A cell is one setting: a coreset ratio and sampler, a layer set, a backbone, an input size and
geometry, a number of shots and a seed... Each cell fits a model on the good training images of
one data set and is evaluated as ``patchcore evaluate`` would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...engine.backbone_specs import feature_stages, resolve_spec
from ...engine.coreset import SAMPLERS, coverage_radius
from ...engine.ensemble import PatchCoreEnsemble
from ...engine.geometry import parse_resize
from ...engine.model import PatchCore
from ..baselines import METHODS, create_detector
from ..datasets import Dataset
from .options import EXPERIMENTS, ExperimentOptions
from .plots import bar_plot, plot_coreset, plot_shots, plot_speed

#: The speed experiment's index names -> PatchCore's search back ends.
INDEXES = {"exact": "numpy", "hnsw": "hnsw", "ivfpq": "ivfpq"}
GEOMETRIES = ("whole", "crop", "tiled")
#: Coverage radius (largest distance of a training patch to the bank) is measured for a cell
#: only when training patches x bank size is at most this (it is an exact search of every patch).
COVERAGE_LIMIT = 5e8


@dataclasses.dataclass
class Spec:
    """One experiment: its cells, how to build and fit each cell's model, its table columns and plot."""

    name: str
    cells: list[dict]
    make_model: Callable[[dict], Any]
    columns: list[str]  # cell keys shown first in the table
    plot: Callable[[list[dict], Path], None]
    dataset_for: Callable[[dict, Dataset], Dataset] | None = None
    #: Fits the model on the training images and returns extra measurements (default: ``model.fit``).
    fit: Callable[[Any, list], dict] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    #: The model settings shared by every cell: a stored cell made with other settings is recomputed.
    settings: dict | None = None


def stage_names(backbone: str) -> list[str]:
    """The backbone's feature stages after the stride-4 one (the candidates for PatchCore's layers)."""
    spec = resolve_spec(backbone)
    return [s["module"] for s in feature_stages(spec.architecture) if s["reduction"] >= 4]


def default_layer_sets(backbone: str) -> list[list[str]]:
    """Single stages, adjacent pairs and adjacent triples of the backbone's stride >= 4 stages."""
    stages = stage_names(backbone)
    sets = [[s] for s in stages]
    sets += [stages[i : i + 2] for i in range(len(stages) - 1)]
    sets += [stages[i : i + 3] for i in range(len(stages) - 2)]
    return sets


def fit_measuring_coverage(model: PatchCore, train: list) -> dict:
    """Fit in the two public steps and measure the coverage radius of the bank over every training patch."""
    with model.extract_patches(train) as patches:
        model.fit_patches(patches)
        if len(patches) * len(model.coreset_indices_) > COVERAGE_LIMIT:
            return {"coverage_radius": None}
        return {"coverage_radius": coverage_radius(patches.read(0, len(patches)), model.coreset_indices_)}


def build_spec(name: str, options: ExperimentOptions, base: dict) -> Spec:
    """The cells and the model factory of experiment ``name``; ``base`` = the model settings."""
    base = {**base, "progress": False}

    def patchcore(**overrides) -> PatchCore:
        return PatchCore(**{**base, **overrides})

    if name == "coreset":
        cells = [{"ratio": r, "subsampling": s} for r in options.ratios for s in SAMPLERS]
        return Spec(name, cells, lambda c: patchcore(coreset_ratio=c["ratio"], sampler=c["subsampling"]),
                    ["ratio", "subsampling"], plot_coreset, fit=fit_measuring_coverage,
                    notes=["Greedy coreset vs random subsampling of the same size. coverage radius = largest distance "
                           "of a training patch to its nearest bank vector (lower is better; measured only where cheap).",
                           ""])
    if name == "layers":
        layer_sets = options.layer_sets or default_layer_sets(base["backbone"])
        cells = [{"layers": "+".join(ls), "p": 3} for ls in layer_sets]
        default_layers = "+".join(resolve_spec(base["backbone"], base.get("layers"), base.get("feature_location")).layers)
        for p in options.neighbourhoods:
            if {"layers": default_layers, "p": p} not in cells:
                cells.append({"layers": default_layers, "p": p})
        return Spec(name, cells, lambda c: patchcore(layers=c["layers"].split("+"), neighbourhood=c["p"]),
                    ["layers", "p"], bar_plot("layers and neighbourhood p"),
                    notes=[f"Backbone {base['backbone']}; p = neighbourhood size (tried with the default layers {default_layers}).", ""])
    if name == "backbones":
        cells = [{"backbone": b} for b in options.backbones]

        def make(c):
            if "+" not in c["backbone"]:
                return patchcore(backbone=c["backbone"])
            members = {key: value for key, value in base.items() if key not in ("backbone", "progress")}
            return PatchCoreEnsemble(c["backbone"].split("+"), members)

        return Spec(name, cells, make, ["backbone"], bar_plot("backbones"),
                    notes=["Backbones whose weights are unavailable are listed as skipped. a+b+c = an ensemble: one "
                           "memory bank per backbone, patch scores standardised on each member's good training "
                           "patches, then averaged.", ""])
    if name == "speed":
        for index in options.indexes:
            if index not in INDEXES:
                raise ValueError(f"unknown index {index!r}: use {', '.join(INDEXES)}")
        cells = [{"ratio": r, "index": i} for r in options.ratios for i in options.indexes]
        return Spec(name, cells, lambda c: patchcore(coreset_ratio=c["ratio"], search_backend=INDEXES[c["index"]]),
                    ["ratio", "index"], plot_speed,
                    notes=["Per-image time split (ms): backbone forward pass (its share of the batch), "
                           "nearest-neighbour search with the eq. 7 re-weighting, anomaly map. exact = numpy "
                           "MemoryBankIndex; hnsw = faiss HNSW; ivfpq = faiss IVF-PQ (as the paper).", ""])
    if name == "shots":
        cells = [{"shots": k, "seed": s} for k in options.shots for s in range(options.seeds)]

        def dataset_for(cell, dataset):
            if cell["shots"] > len(dataset.train):
                raise ValueError(f"{cell['shots']} shots but only {len(dataset.train)} training images")
            rng = np.random.default_rng(cell["seed"])
            chosen = sorted(rng.choice(len(dataset.train), size=cell["shots"], replace=False))
            return dataclasses.replace(dataset, train=[dataset.train[i] for i in chosen])

        return Spec(name, cells, lambda c: patchcore(seed=c["seed"]), ["shots", "seed"], plot_shots,
                    dataset_for=dataset_for,
                    notes=[f"k training images drawn at random (seed 0..{options.seeds - 1}) from train/good; "
                           "mean ± std over seeds.", ""])
    if name == "methods":
        for method in options.methods:
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}: use {', '.join(METHODS)}")
        cells = [{"method": m} for m in options.methods]
        return Spec(name, cells, lambda c: create_detector(c["method"], **base), ["method"],
                    bar_plot("PatchCore vs SPADE vs PaDiM"),
                    notes=["Same backbone features for all three. bank size: PatchCore = coreset; SPADE = every training "
                           "patch; PaDiM = number of per-position Gaussians.", ""])
    if name == "resolution":
        return _resolution_spec(options, patchcore)
    raise ValueError(f"unknown experiment {name!r}: use one of {', '.join(EXPERIMENTS)}")


def _resolution_spec(options: ExperimentOptions, patchcore: Callable[..., PatchCore]) -> Spec:
    cells = []
    for size in options.sizes:
        resize = parse_resize(size)
        for geometry in options.geometries:
            if geometry not in GEOMETRIES:
                raise ValueError(f"unknown geometry {geometry!r}: use {', '.join(GEOMETRIES)}")
            if geometry == "crop" and not isinstance(resize, int):
                continue  # a centre crop is defined relative to a shorter side
            if geometry == "tiled" and isinstance(resize, int) and resize <= options.tile:
                continue  # the whole input fits in one tile: the same as "whole"
            cells.append({"resize": size, "geometry": geometry})

    def make(c):
        resize = parse_resize(c["resize"])
        if c["geometry"] == "crop":
            return patchcore(resize=resize, crop=int(round(resize * 224 / 256)), tile_size=None)
        if c["geometry"] == "tiled":
            return patchcore(resize=resize, crop=None, tile_size=options.tile, tile_overlap=options.tile_overlap)
        return patchcore(resize=resize, crop=None, tile_size=None)

    return Spec("resolution", cells, make, ["resize", "geometry"], bar_plot("input size and geometry"),
                notes=["resize = shorter side of the network input (none = the photo's own size). whole = the "
                       "whole photo, aspect ratio kept; crop = centred square of 224/256 of the shorter side (the "
                       f"paper's protocol at 256); tiled = whole photo cut into {options.tile} px tiles overlapping "
                       f"{options.tile_overlap:g} of a side, stitched. Pixel metrics over every pixel of the photo.", ""])
