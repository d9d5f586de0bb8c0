"""``patchcore tune``: choose a model's settings from good photos alone, then fit and save it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import add_model_options, cli_event, model_settings_from_args, positive_int

#: Model options that say where and how a model runs: they are passed to every candidate, not
#: held fixed as a choice.
RUNNING_OPTIONS = ("device", "threads", "scratch_dir", "batch_size")


def add_tuning_options(parser: argparse.ArgumentParser) -> None:
    """The options of tuning, shared by ``tune`` and ``fit --auto``."""
    from ..evaluation.tuning import DEFAULT_BUDGET_MINUTES, DEFAULT_DEFECTS_PER_PHOTO, DEFAULT_MAX_PREDICT_MS

    group = parser.add_argument_group("tuning")
    group.add_argument("--max-predict-ms", type=float, default=DEFAULT_MAX_PREDICT_MS, metavar="MS",
                       help="largest time to score one photo, measured on your held-out photos one at a time "
                            f"(default: {DEFAULT_MAX_PREDICT_MS:g}, the budget the defaults were chosen under); 0: no limit")
    group.add_argument("--max-fit-seconds", type=float, default=None, metavar="S",
                       help="largest time to fit on all your good photos (estimated from the tuning fits; default: no limit)")
    group.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES, metavar="M",
                       help="stop trying more candidates (cheapest first) after this many minutes "
                            f"(default: {DEFAULT_BUDGET_MINUTES:g}; the final fit on every photo comes after)")
    group.add_argument("--holdout-share", type=float, default=0.2,
                       help="share of the good photos held out to measure on (default: 0.2, at most --max-holdout)")
    group.add_argument("--max-holdout", type=positive_int, default=40, help="most photos held out (default: 40)")
    group.add_argument("--max-train-images", type=positive_int, default=200,
                       help="most photos each candidate is fitted on while tuning (default: 200)")
    group.add_argument("--defects-per-photo", type=positive_int, default=DEFAULT_DEFECTS_PER_PHOTO,
                       help="synthetic defects drawn on each held-out photo, each on its own copy "
                            f"(default: {DEFAULT_DEFECTS_PER_PHOTO})")
    group.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split and the synthetic defects")
    group.add_argument("--candidates", default=None, metavar="FILE",
                       help="JSON file: a list of settings objects to try instead of the built-in list")
    group.add_argument("--defects-dir", default=None, metavar="DIR",
                       help="keep the synthetic defect photos and their masks here, to look at")


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "tune", help="choose settings from good photos alone (synthetic defects), then fit and save",
        description="Hold out some good photos, paste synthetic defects (cut-and-paste patches, scratches, spots, texture "
                    "and colour changes) on the part in them, try candidate settings (input size, tiles, backbone, bank "
                    "share, image-score aggregation, orientation copies) cheapest first within your time limits, and "
                    "fit the best on every good photo. Model options given are held fixed: the candidates vary the rest.")
    parser.add_argument("train", nargs="+", metavar="TRAIN", help="folder(s) or image files of good products")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="folder to save the model in")
    parser.add_argument("--json", action="store_true", help="print the tuning record as JSON instead of the table")
    add_tuning_options(parser)
    add_model_options(parser)
    parser.set_defaults(handler=run)


def busy_warning(max_predict_ms: float | None) -> str | None:
    """A warning when the machine is already busy: the time per photo that the predict limit is
    checked against is measured as the machine is, and other jobs inflate it."""
    import os

    from ..engine.cpus import available_cpus

    if not max_predict_ms or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], available_cpus()
    if load < cores:
        return None
    return (f"tune: this machine is busy (load {load:.1f} on {cores} cores): the times per photo measured now "
            f"come out slower than on an idle machine, so candidates that would score within "
            f"--max-predict-ms {max_predict_ms:g} may be left out; tune when it is idle, or raise the limit")


def tune_from_args(args: argparse.Namespace):
    """Tune as the options say; prints the table (or JSON) and returns (result, base settings)."""
    from ..evaluation.tuning import DEFAULT_CANDIDATES, Limits, format_trials, tune

    given = model_settings_from_args(args)
    base = {key: given.pop(key) for key in RUNNING_OPTIONS if key in given}
    candidates = DEFAULT_CANDIDATES
    if args.candidates:
        candidates = json.loads(Path(args.candidates).read_text())
        if not isinstance(candidates, list) or not all(isinstance(c, dict) for c in candidates):
            raise ValueError(f"{args.candidates}: expected a JSON list of settings objects")
    limits = Limits(max_fit_seconds=args.max_fit_seconds, max_predict_ms=args.max_predict_ms or None,
                    budget_minutes=args.budget_minutes)
    warning = busy_warning(limits.max_predict_ms)
    if warning:
        print(warning, file=sys.stderr)
    result = tune(args.train, candidates, fixed=given, base=base, limits=limits, holdout_share=args.holdout_share,
                  max_holdout=args.max_holdout, max_train_images=args.max_train_images, seed=args.split_seed,
                  defects_per_photo=args.defects_per_photo,
                  defects_dir=args.defects_dir)
    if not getattr(args, "json", False):
        print(format_trials(result.trials, result.chosen))
    return result, base, limits


def fit_and_save(args: argparse.Namespace, result, base: dict, limits) -> object:
    """Fit the chosen setting on every photo and save it with the tuning record; the model."""
    from ..evaluation.tuning import describe, fit_chosen, no_choice_message, save_tuned

    if result.chosen is None:
        raise ValueError(no_choice_message(result.trials, limits))
    if not getattr(args, "json", False):
        print(f"chosen: {describe(result.chosen.settings)}; fitting on every good photo")
    model = fit_chosen(args.train, result, base)
    if getattr(args, "calibrate", None):
        model.calibrate_threshold(args.calibrate, args.max_fpr, args.max_pixel_fpr)
    user = cli_event("fit").get("user")
    save_tuned(model, args.output, result.record, details={"user": user})
    return model


def run(args: argparse.Namespace) -> int:
    result, base, limits = tune_from_args(args)
    fit_and_save(args, result, base, limits)
    if args.json:
        print(json.dumps(result.record, indent=2, default=str))
    else:
        print(f"saved to {args.output} (tuning {result.record['tuning_seconds']:.0f} s, final fit "
              f"{result.record['final_fit_seconds']:.0f} s); the tuning record is in its history: "
              f"patchcore history {args.output} --json")
    print(f"tuned in {result.record['tuning_seconds'] + result.record['final_fit_seconds']:.0f} s", file=sys.stderr)
    return 0
