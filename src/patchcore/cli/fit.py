"""``patchcore fit``: build a model from good images and save it (``--auto``: choose its settings first)."""

from __future__ import annotations

import argparse
import sys

from .options import (SkippedImages, add_false_positive_options, add_model_options, add_ray_options, add_skip_option,
                      cli_event, model_from_args)
from .tune import add_tuning_options, fit_and_save, tune_from_args


def add_parser(commands) -> None:
    parser = commands.add_parser("fit", help="build a model from a folder of good images",
                                 description="Fit a PatchCore model on images of good products and save it.")
    parser.add_argument("train", nargs="+", metavar="TRAIN", help="folder(s) or image files of good products")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="folder to save the model in")
    add_skip_option(parser)
    parser.add_argument("--calibrate", nargs="+", metavar="GOOD", default=None,
                        help="held-out good images or folders: set the image and pixel thresholds from them (instead "
                             "of from the training photos themselves, the default)")
    parser.add_argument("--no-threshold", action="store_true",
                        help="set no thresholds (scores only): skip the self-calibration on the training photos")
    parser.add_argument("--calibration-photos", type=int, default=None, metavar="N",
                        help="self-calibration: training photos scored, each left out of the bank in turn (a seeded "
                             "sample; default: 50, or all when fewer)")
    add_false_positive_options(parser, "--calibrate or the training photos")
    add_model_options(parser)
    parser.add_argument("--auto", action="store_true",
                        help="choose the settings first, as 'patchcore tune' does: from held-out good photos with "
                             "synthetic defects, within the tuning limits below (model options given are held fixed)")
    add_tuning_options(parser)
    add_ray_options(parser, "fit on Ray: a local Ray, or the cluster at ADDRESS ('auto': the one this machine is in); "
                            "TRAIN may also be file-system URIs that pyarrow reads (s3://bucket/folder); workers turn "
                            "chunks of photos into patches and keep each chunk's coreset, this machine merges them",
                    "actors, each holding the network once")
    parser.set_defaults(handler=run)


def calibration_settings(args: argparse.Namespace) -> dict:
    """How the fit sets thresholds: from its own training photos (default), not at all
    (``--no-threshold``), or not at fit when ``--calibrate`` gives held-out photos, which then do."""
    if args.calibrate and args.no_threshold:
        raise ValueError("--calibrate sets thresholds and --no-threshold sets none: give one of them")
    settings = {"max_fpr": args.max_fpr, "max_pixel_fpr": args.max_pixel_fpr,
                "calibration": "none" if args.calibrate or args.no_threshold else "self"}
    if args.calibration_photos is not None:
        settings["calibration_photos"] = args.calibration_photos
    return settings


def run(args: argparse.Namespace) -> int:
    calibration = args.calibration_settings = calibration_settings(args)  # read by model_from_args
    if args.auto:
        if args.ray is not None:
            raise ValueError("--auto tunes on this machine: run 'patchcore tune' (or fit --auto) here, then fit its "
                             "chosen settings with --ray")
        if args.skip_bad_images:
            raise ValueError("--auto does not skip bad images: remove them, or fit without --auto")
        skipped = None
        result, base, limits = tune_from_args(args)
        model = fit_and_save(args, result, {**base, **calibration}, limits)
    else:
        skipped = SkippedImages() if args.skip_bad_images else None
        if args.ray is not None:
            from ..fleet.distributed_fit import fit_on_ray

            model = fit_on_ray(model_from_args(args), args.train, address=args.ray or None, workers=args.workers,
                               cpus_per_worker=args.cpus_per_worker, on_error=skipped)
        else:
            model = model_from_args(args).fit(args.train, on_error=skipped)
        if args.calibrate:
            model.calibrate_threshold(args.calibrate, args.max_fpr, args.max_pixel_fpr)
        model.save(args.output, event=cli_event("fit"))
    if model.threshold_ is not None:
        record = model.calibration_
        print(f"threshold {model.threshold_:.4f}, pixel threshold {model.pixel_threshold_:.4f}: {model.threshold_kind()}, "
              f"false-positive rate <= {record['max_fpr']:g} (image) and {record['max_pixel_fpr']:g} (pixel); "
              f"{model.threshold_estimate()}")
    else:
        why = ("--no-threshold" if args.no_threshold else
               "the fit did not self-calibrate: it needs 2 training photos or more")
        print(f"no threshold ({why}): scores only, no verdicts; --calibrate GOOD sets one from held-out good photos")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in model.fit_timings_.items())
    features_mib = model.n_training_patches_ * model.memory_bank_.shape[1] * 4 / 2**20
    per_image = model.n_training_patches_ / max(1, model.n_training_images_)
    print(f"fitted on {model.n_training_images_} images ({model.n_training_patches_} patches, {per_image:.0f} per image; "
          f"{features_mib:.0f} MiB of "
          f"features): memory bank {model.memory_bank_.shape[0]} x {model.memory_bank_.shape[1]} "
          f"({model.memory_bank_.nbytes / 2**20:.1f} MiB; {timings}); search: {model.index_.__class__.__name__} "
          f"finding {100 * model.search_recall_:.1f}% of nearest neighbours exactly; saved to {args.output}")
    if skipped and skipped.errors:
        print(f"{len(skipped.errors)} image(s) skipped", file=sys.stderr)
    return 0
