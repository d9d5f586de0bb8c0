"""Choosing a model's settings from good photos alone (issue 18): ``patchcore tune``.

A share of the good photos is held out (seeded); each held-out photo is scored as it is (good)
and with one synthetic defect pasted on its part (:mod:`.synthetic_defects`). Every candidate
setting is fitted on the rest and measured on them: synthetic image AUROC, AUPRO on the defects'
masks, fit seconds and milliseconds per photo (each held-out photo predicted alone from its file,
as a served model sees it). Candidates over the user's limits are reported and not chosen; the
overall budget stops trying more, cheapest first. The chosen setting is then fitted on every good
photo, and the model keeps the tuning record in its history (:func:`save_tuned`,
:func:`tuning_record`).

**Ranking score**: the mean of synthetic image AUROC and AUPRO. Image AUROC is the decision a user
takes (pass or reject a photo), but on pasted defects it saturates (every candidate finds the
large ones); AUPRO keeps separating candidates there and counts each defect region alike, so it
rewards finding the small ones, which is where settings differ most (resolution, backbone).
Ties go to the faster candidate.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..engine import persistence
from ..engine.augmentation import parse_augment
from ..engine.images import expand_sources, read_image
from ..engine.settings import DEFAULTS, ModelSettings
from .panels import resize_map, resize_mask
from .synthetic_defects import BackgroundColours, synthesize_defects

#: The settings tried by default, as data: each a dict of :class:`ModelSettings` overrides. A
#: candidate naming a setting this patchcore lacks is reported as skipped, so that entries for
#: settings still to come (e.g. ``augment``, ``image_score``) can be listed before they exist.
DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"backbone": "efficientnet_lite0", "resize": 320},
    {"backbone": "efficientnet_lite0", "resize": 384},
    {"backbone": "efficientnet_lite2", "resize": 320},
    {"backbone": "efficientnet_lite2", "resize": 384},  # the defaults
    {"backbone": "efficientnet_lite1", "resize": 384},
    {"backbone": "efficientnet_lite2", "resize": 384, "coreset_ratio": 0.025},
    {"backbone": "efficientnet_lite2", "resize": 448},
    {"backbone": "efficientnet_lite2", "resize": 512},
    {"backbone": "efficientnet_lite2", "resize": 512, "tile_size": 384},
    # Patches finer than the photo's own pixels: macaroni1 (750x500) reached 98.5 image AUROC at 640.
    {"backbone": "efficientnet_lite2", "resize": 640},
    # The image score from the mean of the top 1% of patch scores rather than the largest one.
    {"backbone": "efficientnet_lite2", "resize": 384, "aggregation": "top1%"},
    # The bank also filled from mirrored and half-turned copies: for parts that come in any orientation.
    {"backbone": "efficientnet_lite2", "resize": 384, "augment": "flip"},
)
#: Relative cost of the backbones per input pixel (lite0 = 1), for trying the cheapest first.
BACKBONE_COST = {"efficientnet_lite0": 1.0, "efficientnet_lite1": 1.4, "efficientnet_lite2": 1.6}
#: The predict limit the README's defaults were chosen under: 150 ms per photo.
DEFAULT_MAX_PREDICT_MS = 150.0
DEFAULT_BUDGET_MINUTES = 30.0
#: Synthetic defects per held-out photo, each on its own copy: more defects, steadier rankings (Spearman
#: with real defects 0.62 -> 0.90 on bottle, 0.83 -> 0.88 on macaroni1 going from 1 to 3; docs/experiments.md).
DEFAULT_DEFECTS_PER_PHOTO = 3
#: Longer side of the maps and masks that AUPRO is computed on (full size costs more and ranks alike).
PIXEL_EVAL_SIDE = 256
AUPRO_FPR_LIMIT = 0.3
SCORE_NAME = "mean of synthetic image AUROC and AUPRO"


@dataclass(frozen=True)
class Limits:
    """What the user allows: fit seconds (on every good photo, estimated), milliseconds per photo,
    and minutes for trying candidates (``None``: no limit)."""

    max_fit_seconds: float | None = None
    max_predict_ms: float | None = DEFAULT_MAX_PREDICT_MS
    budget_minutes: float | None = DEFAULT_BUDGET_MINUTES


@dataclass
class Trial:
    """One candidate: its settings (the overrides) and what was measured."""

    settings: dict[str, Any]
    status: str = "not tried"  # measured | not tried | skipped | failed
    fit_seconds: float | None = None
    fit_seconds_all: float | None = None  # estimated for every good photo
    predict_ms: float | None = None
    image_auroc: float | None = None
    aupro: float | None = None
    score: float | None = None
    within_budget: bool | None = None
    note: str = ""


@dataclass
class HeldOut:
    """The split: photos to fit on, held-out good photos (files) and the same photos with a
    synthetic defect each (files, with masks)."""

    train: list[Path]
    good: list[Path]
    defective: list[Path]
    masks: list[np.ndarray]
    kinds: list[str]
    part_note: str
    n_all: int


@dataclass
class TuningResult:
    """The trials (in the order tried), the chosen one, and the record a model keeps."""

    trials: list[Trial]
    chosen: Trial | None
    record: dict[str, Any] = field(default_factory=dict)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ranking_score(image_auroc: float, aupro: float) -> float:
    """The one number candidates are ranked by (see the module's docstring for why)."""
    return 0.5 * (image_auroc + aupro)


def estimated_cost(settings: dict[str, Any]) -> float:
    """A rough relative cost (input pixels x backbone x bank share), to try the cheapest first."""
    resize = settings.get("resize", DEFAULTS["resize"])
    if resize is None:
        pixels = 1024.0**2
    elif isinstance(resize, (tuple, list)):
        pixels = float(resize[0] * resize[1])
    else:
        pixels = 1.5 * float(resize) ** 2
    backbone = BACKBONE_COST.get(settings.get("backbone", DEFAULTS["backbone"]), 3.0)
    tiles = 1.2 if settings.get("tile_size") else 1.0
    copies = len(parse_augment(str(settings.get("augment", "none"))))  # the fit's cost grows with the copies
    bank = 1.0 + 20.0 * float(settings.get("coreset_ratio", DEFAULTS["coreset_ratio"]))
    return pixels * backbone * tiles * bank * (1.0 + 0.5 * (copies - 1))


def unknown_settings(settings: dict[str, Any]) -> list[str]:
    known = {f.name for f in fields(ModelSettings)}
    return sorted(set(settings) - known)


def candidate_list(candidates: Sequence[dict[str, Any]], fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates with the user's fixed settings imposed (they win), duplicates dropped,
    cheapest first (ties keep the list's order)."""
    seen, result = set(), []
    for candidate in candidates:
        merged = {**candidate, **fixed}
        key = repr(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in merged.items()))
        if key not in seen:
            seen.add(key)
            result.append(merged)
    return sorted(result, key=estimated_cost)


def check_limits(trial: Trial, limits: Limits) -> tuple[bool, str]:
    """Whether a measured trial is within the fit and predict limits, and if not, why."""
    problems = []
    if limits.max_predict_ms is not None and trial.predict_ms is not None and trial.predict_ms > limits.max_predict_ms:
        problems.append(f"predict {trial.predict_ms:.0f} > {limits.max_predict_ms:g} ms")
    if limits.max_fit_seconds is not None and trial.fit_seconds_all is not None and \
            trial.fit_seconds_all > limits.max_fit_seconds:
        problems.append(f"fit ~{trial.fit_seconds_all:.0f} > {limits.max_fit_seconds:g} s")
    return not problems, "; ".join(problems)


def choose(trials: Sequence[Trial], limits: Limits) -> Trial | None:
    """The measured trial within the limits with the highest ranking score (ties: fewer ms per
    photo, then the earlier); ``None`` when no trial is within them."""
    eligible = [t for t in trials if t.status == "measured" and t.score is not None and check_limits(t, limits)[0]]
    if not eligible:
        return None
    return min(eligible, key=lambda t: (-t.score, t.predict_ms if t.predict_ms is not None else math.inf,
                                        trials.index(t)))


# -- the held-out photos ---------------------------------------------------------------------


def split_images(images: Sequence[Path], holdout_share: float, max_holdout: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(training part, held-out part): a seeded share of the photos, at least 2 held out and
    at least 2 left to fit on, at most ``max_holdout`` held out."""
    if not 0.0 < holdout_share < 1.0:
        raise ValueError(f"holdout share must lie in (0, 1), got {holdout_share}")
    if len(images) < 4:
        raise ValueError(f"tuning needs at least 4 good photos (2 to fit on, 2 to hold out), got {len(images)}")
    count = min(max_holdout, max(2, round(holdout_share * len(images))), len(images) - 2)
    order = np.random.default_rng(seed).permutation(len(images))
    held = sorted(order[:count])
    rest = sorted(order[count:])
    return [images[i] for i in rest], [images[i] for i in held]


def prepare_holdout(images: Sequence[Path], folder: Path, holdout_share: float = 0.2, max_holdout: int = 40,
                    max_train_images: int | None = 200, seed: int = 0, defects_per_photo: int = 1) -> HeldOut:
    """Split the photos, draw ``defects_per_photo`` synthetic defects on each held-out photo (one
    per copy) and write those to ``folder`` (``<stem>_defect.png`` and ``<stem>_mask.png``). The background of the part masks
    is learnt from up to 50 photos of the training part. ``max_train_images`` caps (seeded) the
    photos candidates are fitted on: fitting is most of tuning's time."""
    train, held = split_images(list(images), holdout_share, max_holdout, seed)
    if max_train_images is not None and len(train) > max_train_images:
        keep = np.random.default_rng(seed + 1).choice(len(train), max_train_images, replace=False)
        train = [train[i] for i in sorted(keep)]
    sample = [train[i] for i in np.linspace(0, len(train) - 1, min(50, len(train))).round().astype(int)]
    background = BackgroundColours.from_images([np.asarray(read_image(path)) for path in sample])
    photos = [np.asarray(read_image(path)) for path in held]
    defects, parts = synthesize_defects(photos, seed=seed, background=background, per_photo=defects_per_photo)
    folder.mkdir(parents=True, exist_ok=True)
    defective = []
    for i, defect in enumerate(defects):
        path = held[i // defects_per_photo]
        stem = f"{i:03d}_{Path(path).stem}_{defect.kind}"
        Image.fromarray(defect.image).save(folder / f"{stem}_defect.png")
        Image.fromarray(defect.mask.astype(np.uint8) * 255).save(folder / f"{stem}_mask.png")
        defective.append(folder / f"{stem}_defect.png")
    found = sum(part.found for part in parts)
    part_note = (f"part separated from the background in {found} of {len(parts)} held-out photos"
                 if found else f"no part separated from the background: defects anywhere on the photo ({parts[0].note})")
    return HeldOut(train, held, defective, [d.mask for d in defects], [d.kind for d in defects], part_note, len(images))


# -- measuring one candidate -----------------------------------------------------------------


def _eval_size(shape: tuple[int, int]) -> tuple[int, int]:
    height, width = shape
    scale = min(1.0, PIXEL_EVAL_SIDE / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fit_estimate(timings: dict[str, float], ratio: float) -> float:
    """Fit seconds on ``ratio`` times the photos: features and index grow linearly, the greedy
    coreset about quadratically (its bank grows with the patches), loading (and quantising) the
    network not at all."""
    fixed = timings.get("backbone_load", 0.0) + timings.get("quantize", 0.0)
    return fixed + ratio * (timings.get("features", 0.0) + timings.get("index", 0.0)) + ratio**2 * timings.get("coreset", 0.0)


def measure(settings: dict[str, Any], held: HeldOut, make_model: Callable[[dict[str, Any]], Any]) -> Trial:
    """Fit ``make_model(settings)`` on the training part and measure it on the held-out photos."""
    from . import metrics  # scikit-learn: only when tuning runs, not when the command line is built

    trial = Trial(dict(settings))
    model = make_model(settings)
    started = time.perf_counter()
    model.fit(held.train)
    trial.fit_seconds = time.perf_counter() - started
    trial.fit_seconds_all = _fit_estimate(getattr(model, "fit_timings_", {}), held.n_all / len(held.train))
    scores, times = [], []
    pixels = metrics.PixelScores(len(held.good) + len(held.defective))
    for path in held.good:  # one photo at a time, from its file: what a served model sees
        t0 = time.perf_counter()
        prediction = model.predict([path], maps=True)[0]
        times.append(time.perf_counter() - t0)
        scores.append(prediction.score)
        size = _eval_size(prediction.anomaly_map.shape)
        pixels.add(np.zeros(size[::-1], bool), resize_map(prediction.anomaly_map, size))
    for prediction, mask in zip(model.iter_predict(held.defective, maps=True), held.masks):
        scores.append(prediction.score)
        size = _eval_size(mask.shape)
        pixels.add(resize_mask(mask, size), resize_map(prediction.anomaly_map, size))
    labels = [0] * len(held.good) + [1] * len(held.defective)
    trial.predict_ms = 1000.0 * float(np.median(times))
    trial.image_auroc = metrics.image_auroc(labels, scores)
    trial.aupro = metrics.area_under_pro(*pixels.pro_curve(), AUPRO_FPR_LIMIT)
    trial.score = ranking_score(trial.image_auroc, trial.aupro)
    trial.status = "measured"
    return trial


def _default_model(base: dict[str, Any]) -> Callable[[dict[str, Any]], Any]:
    def make(settings: dict[str, Any]):
        from ..engine.model import PatchCore

        return PatchCore(**{**base, **settings})

    return make


# -- tuning ----------------------------------------------------------------------------------


def tune(images: Sequence[str | os.PathLike] | str | os.PathLike, candidates: Sequence[dict[str, Any]] = DEFAULT_CANDIDATES,
         fixed: dict[str, Any] | None = None, base: dict[str, Any] | None = None, limits: Limits = Limits(),
         holdout_share: float = 0.2, max_holdout: int = 40, max_train_images: int | None = 200, seed: int = 0,
         defects_per_photo: int = DEFAULT_DEFECTS_PER_PHOTO, defects_dir: str | os.PathLike | None = None,
         progress: bool = True) -> TuningResult:
    """Try ``candidates`` (settings dicts; ``fixed`` settings imposed on each, ``base`` settings
    under them, e.g. threads) on good photos with synthetic defects and choose one (see the
    module's docstring). Stops starting candidates once ``limits.budget_minutes`` have passed (the
    first always runs). ``chosen`` is ``None`` when no measured candidate is within the limits."""
    started = time.perf_counter()
    paths = [Path(p) for p in expand_sources(images) if isinstance(p, (str, os.PathLike))]
    fixed, base = dict(fixed or {}), dict(base or {})
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="patchcore-tune-") as scratch:
        folder = Path(defects_dir) if defects_dir is not None else Path(scratch)
        held = prepare_holdout(paths, folder, holdout_share, max_holdout, max_train_images, seed, defects_per_photo)
        if progress:
            log(f"tune: fitting candidates on {len(held.train)} photos, measuring on {len(held.good)} held-out good photos "
                f"and {len(held.defective)} copies of them with a synthetic defect ({held.part_note})")
        make_model = _default_model(base)
        trials: list[Trial] = []
        ordered = candidate_list(candidates, fixed)
        for number, settings in enumerate(ordered, 1):
            unknown = unknown_settings(settings)
            if unknown:
                trials.append(Trial(settings, "skipped", note=f"needs setting {', '.join(unknown)}, which this patchcore lacks"))
                continue
            spent = (time.perf_counter() - started) / 60.0
            if limits.budget_minutes is not None and spent >= limits.budget_minutes and \
                    any(t.status != "skipped" for t in trials):
                trials.append(Trial(settings, "not tried", note=f"budget of {limits.budget_minutes:g} min spent"))
                continue
            if progress:
                log(f"tune: [{number}/{len(ordered)}] {describe(settings)}")
            try:
                trial = measure(settings, held, make_model)
            except Exception as error:  # one candidate that cannot run must not stop the others
                trial = Trial(settings, "failed", note=f"{type(error).__name__}: {error}")
            if trial.status == "measured":
                trial.within_budget, trial.note = check_limits(trial, limits)
                if progress:
                    log(f"tune:   fit {trial.fit_seconds:.1f} s, {trial.predict_ms:.0f} ms/photo, image AUROC "
                        f"{100 * trial.image_auroc:.1f}, AUPRO {100 * trial.aupro:.1f}"
                        f"{'' if trial.within_budget else ' (over the limits: ' + trial.note + ')'}")
            trials.append(trial)
    chosen = choose(trials, limits)
    record = {
        "chosen": None if chosen is None else chosen.settings,
        "ranking_score": SCORE_NAME,
        "limits": asdict(limits),
        "fixed": fixed,
        "held_out": {"train": len(held.train), "good": len(held.good), "defective": len(held.defective),
                     "all_good_photos": held.n_all, "seed": seed, "kinds": sorted(set(held.kinds)),
                     "part_masks": held.part_note},
        "trials": [asdict(t) for t in trials],
        "tuning_seconds": time.perf_counter() - started,
        "load_average": list(load_before) if load_before else None,
    }
    return TuningResult(trials, chosen, record)


def no_choice_message(trials: Sequence[Trial], limits: Limits) -> str:
    """Why nothing was chosen, and what would change it."""
    measured = [t for t in trials if t.status == "measured"]
    if not measured:
        return "no candidate could be measured (see the table)"
    fastest = min(measured, key=lambda t: t.predict_ms)
    return (f"no candidate met the limits (max predict {limits.max_predict_ms} ms, max fit {limits.max_fit_seconds} s); "
            f"the fastest, {describe(fastest.settings)}, took {fastest.predict_ms:.0f} ms per photo and about "
            f"{fastest.fit_seconds_all:.0f} s to fit: raise --max-predict-ms or --max-fit-seconds")


def fit_chosen(images: Sequence[str | os.PathLike] | str | os.PathLike, result: TuningResult,
               base: dict[str, Any] | None = None):
    """The chosen setting fitted on every good photo (``base`` settings under it)."""
    if result.chosen is None:
        raise ValueError("nothing was chosen")
    from ..engine.model import PatchCore

    started = time.perf_counter()
    model = PatchCore(**{**(base or {}), **result.chosen.settings}).fit(images)
    result.record["final_fit_seconds"] = time.perf_counter() - started
    return model


def save_tuned(model, directory: str | os.PathLike, record: dict[str, Any], who: str = "tune",
               details: dict[str, Any] | None = None) -> None:
    """Save ``model`` with the tuning record in its manifest and history."""
    model.save(directory, event={"action": "fit", "who": who, **(details or {}), "tuning": record})


def tuning_record(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The tuning record of the latest tuned version of a model directory (``None``: never tuned)."""
    for entry in reversed(persistence.history(model_dir)):
        if "tuning" in entry:
            return entry["tuning"]
    return None


# -- showing it ------------------------------------------------------------------------------


def describe(settings: dict[str, Any]) -> str:
    """Settings as short text: ``lite2 384 bank 1%``, plus any other setting as name=value."""
    parts = []
    backbone = settings.get("backbone", DEFAULTS["backbone"])
    parts.append(str(backbone).replace("efficientnet_", ""))
    resize = settings.get("resize", DEFAULTS["resize"])
    parts.append("x".join(map(str, resize)) if isinstance(resize, (tuple, list)) else str(resize))
    parts.append(f"bank {100 * float(settings.get('coreset_ratio', DEFAULTS['coreset_ratio'])):g}%")
    if settings.get("tile_size"):
        parts.append(f"tiles {settings['tile_size']}")
    shown = {"backbone", "resize", "coreset_ratio", "tile_size"}
    parts += [f"{key}={value}" for key, value in sorted(settings.items()) if key not in shown]
    return " ".join(parts)


def _cell(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{scale * value:.{digits}f}"


def format_trials(trials: Sequence[Trial], chosen: Trial | None = None) -> str:
    """The table of what was tried: settings, fit s (measured; estimated on every photo), ms per
    photo, synthetic image AUROC and AUPRO (percent), ranking score, within the limits."""
    header = ("", "settings", "fit s", "fit s (all, est.)", "ms/photo", "image AUROC", "AUPRO", "score", "within limits",
              "note")
    rows = [header]
    for trial in trials:
        within = {True: "yes", False: "no", None: "-"}[trial.within_budget]
        note = trial.note if trial.status in ("measured", "") else f"{trial.status}: {trial.note}".rstrip(": ")
        rows.append(("*" if trial is chosen else "", describe(trial.settings), _cell(trial.fit_seconds),
                     _cell(trial.fit_seconds_all, digits=0), _cell(trial.predict_ms, digits=0),
                     _cell(trial.image_auroc, 100), _cell(trial.aupro, 100), _cell(trial.score, 100), within, note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
