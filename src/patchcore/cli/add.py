"""``patchcore add``: teach a model new good images without refitting (saved or exported models)."""

from __future__ import annotations

import argparse

from .options import SkippedImages, add_false_positive_options, add_skip_option, cli_event, ratio


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "add", help="teach a model new good images (false alarms, new variation) without refitting",
        description="Add good images to a model's memory bank by continuing its greedy coreset selection from the "
                    "current bank; the old training images are not needed. The model directory is replaced "
                    "atomically; thresholds are kept unless --recalibrate gives held-out good images, or "
                    "'--recalibrate self' re-estimates them from the bank's own photos.")
    parser.add_argument("model", metavar="MODEL_DIR", help="folder written by 'patchcore fit' or 'patchcore export'")
    parser.add_argument("good", nargs="+", metavar="GOOD", help="good images or folders to add")
    parser.add_argument("--coreset-ratio", type=ratio, default=None,
                        help="share of the new images' patches that may join the bank (default: the model's)")
    parser.add_argument("--recalibrate", nargs="+", metavar="GOOD", default=None,
                        help="held-out good images: set the image and pixel thresholds again from them; 'self': "
                             "from the photos the bank came from (training and taught photos, read again from where "
                             "they were: each left out of the bank in turn, as at fit)")
    add_false_positive_options(parser, "--recalibrate")
    add_skip_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.loading import load_model
    from ..engine.persistence import model_lock, read_manifest

    with model_lock(args.model):  # no other writer (a service's teach-in, a rollback) in between
        model = load_model(args.model)
        before = model.memory_bank_.shape[0]
        model.partial_fit(args.good, on_error=SkippedImages() if args.skip_bad_images else None,
                          coreset_ratio=args.coreset_ratio)
        if args.recalibrate == ["self"]:
            model.self_calibrate_threshold(max_false_positive_rate=args.max_fpr,
                                           max_pixel_false_positive_rate=args.max_pixel_fpr)
        elif args.recalibrate:
            model.calibrate_threshold(args.recalibrate, args.max_fpr, args.max_pixel_fpr)
        model.save(args.model, event=cli_event("teach-in"))
        version = read_manifest(args.model)["version"]
    added = model.teach_in_[-1]
    print(f"added {added['images']} good images ({added['patches']} patches): memory bank {before} -> "
          f"{model.memory_bank_.shape[0]} vectors in {added['seconds']:.1f} s"
          + (" (stopped at max_bank_size)" if added["capped"] else "")
          + f"; saved to {args.model} as version {version} ('patchcore rollback {args.model}' undoes it)"
          + (f"; thresholds set again: {model.threshold_:.4f} / {model.pixel_threshold_:.4f} ({model.threshold_kind()}; "
             f"{model.threshold_estimate()})" if args.recalibrate else
             f"; thresholds kept ({model.threshold_kind()})"))
    return 0
