"""``patchcore predict``: score images with a saved model; write scores, overlays and masks as they come."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from ..engine.evidence import evidence_picture
from ..engine.loading import load_model
from ..engine.overlay import model_heat_scale, overlay_beside_photo, save_png
from ..engine.persistence import model_sha256
from ..engine.prediction import Prediction
from ..engine.scores_file import ScoresFile
from ..errors import ImageLoadError
from .options import SkippedImages, add_ray_options, add_runtime_options, positive_int, use_device


def add_parser(commands) -> None:
    parser = commands.add_parser("predict", help="score images with a saved model",
                                 description="Score images with a saved model; write scores.csv, heat-map overlays "
                                             "and, when the model has a pixel threshold, defect masks.")
    parser.add_argument("model", metavar="MODEL_DIR", help="folder written by 'patchcore fit' or 'patchcore export'")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for scores.csv and overlays/; scores.csv is started afresh "
                             "(with --ray: continued)")
    parser.add_argument("--no-overlays", action="store_true", help="write scores (and masks) only")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per forward pass (default: as fitted)")
    parser.add_argument("--evidence", type=int, default=0, metavar="N",
                        help="for the N most anomalous patches of each image, the nearest normal patch of the training "
                             "images: evidence.json and evidence/ crops (default: 0, none)")
    add_runtime_options(parser)
    add_ray_options(parser, "score on Ray: a local Ray, or the cluster at ADDRESS ('auto': the one this machine is in); "
                            "results are appended to OUT/scores.csv as they finish; a rerun skips the images scored there and "
                            "scores the failed ones again (the file must hold this model's scores)",
                    "actors, each loading the model once")
    parser.set_defaults(handler=run)


class OutputNames:
    """File names for outputs that keep the source's name and extension (``x.tif`` -> ``x.tif.png``)
    and stay unique when two sources share a name (``x.tif-2.png``)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, source: str, position: int) -> str:
        base = Path(source).name or f"image{position}"
        name, count = base, 1
        while name in self.used:
            count += 1
            name = f"{base}-{count}"
        self.used.add(name)
        return name + ".png"


def write_predictions(model, predictions: Iterable[Prediction], output: Path, scores: ScoresFile, overlays: bool = True,
                      evidence: bool = False) -> list[Prediction]:
    """Write each prediction as it arrives: a row of ``scores``, its heat-map overlay, and with a
    pixel threshold its binary defect mask.

    Overlays share the model's fixed colour scale (:func:`~patchcore.engine.overlay.heat_scale`), so
    colours compare across images and runs; each photo is decoded once, for scoring and drawing. With ``evidence``, each
    prediction's evidence goes to ``evidence.json`` (written at the end, or when interrupted) and a picture
    of each item (the patch beside its nearest normal patch) to ``evidence/``. An interrupted run
    keeps every line written so far. Returns the predictions (without their maps and photos).
    """
    output.mkdir(parents=True, exist_ok=True)
    pixel_threshold = model.pixel_threshold_
    low, high = model_heat_scale(model)
    if overlays:
        (output / "overlays").mkdir(exist_ok=True)
    if pixel_threshold is not None:
        (output / "masks").mkdir(exist_ok=True)
    if evidence:
        (output / "evidence").mkdir(exist_ok=True)
    found: dict[str, list[dict]] = {}
    done: list[Prediction] = []
    try:
        _write_rows(predictions, output, scores, overlays, evidence, low, high, found, done)
    finally:  # also when interrupted: the evidence of every image written so far
        if evidence:
            (output / "evidence.json").write_text(json.dumps(found, indent=2) + "\n")
    return done


def _write_rows(predictions, output, scores, overlays, evidence, low, high, found, done) -> None:
    names = OutputNames()
    for position, prediction in enumerate(predictions):
        scores.add(prediction.name, prediction.score, prediction.is_anomalous)
        name = names(prediction.name, position)
        if overlays:
            save_png(overlay_beside_photo(prediction.image, prediction.anomaly_map, low, high), output / "overlays" / name)
        if prediction.mask is not None:
            Image.fromarray(prediction.mask.astype(np.uint8) * 255).save(output / "masks" / name)
        if evidence:
            found[prediction.name] = []
            for k, item in enumerate(prediction.evidence, 1):
                picture = f"{name[:-4]}-{k}.png"
                save_png(evidence_picture(prediction.image, item), output / "evidence" / picture)
                found[prediction.name].append({**item.to_dict(), "picture": f"evidence/{picture}"})
        prediction.anomaly_map = prediction.mask = prediction.image = None
        done.append(prediction)


def run(args: argparse.Namespace) -> int:
    if args.ray is not None:
        return _run_on_ray(args)
    model = load_model(args.model, threads=args.threads)
    use_device(model, args.device)
    model.set_params(progress=True, **({"batch_size": args.batch_size} if args.batch_size else {}))
    skipped = SkippedImages()
    want_maps = not args.no_overlays or model.pixel_threshold_ is not None
    if args.evidence and model.memory_bank_origin_ is None:
        raise ValueError(f"{args.model}: the model does not record where its memory bank came from (saved by an older "
                         "patchcore); fit it again for --evidence")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ScoresFile.start(output / "scores.csv", model_sha256(args.model)) as scores:
        def unreadable(error: ImageLoadError) -> None:
            skipped(error)  # a warning now, and a row with the reason
            scores.add_failure(error.source, error.problem)

        stream = model.iter_predict(args.inputs, maps=want_maps, on_error=unreadable,
                                    keep_images=not args.no_overlays or args.evidence > 0, evidence=args.evidence)
        predictions = write_predictions(model, stream, output, scores, overlays=not args.no_overlays,
                                        evidence=args.evidence > 0)
    print(f"verdicts: score >= threshold {model.threshold_:.4f} ({model.threshold_kind()})" if model.threshold_ is not None
          else "no threshold: scores only, no verdicts")
    for prediction in predictions:
        verdict = "" if prediction.is_anomalous is None else ("  ANOMALOUS" if prediction.is_anomalous else "  ok")
        print(f"{prediction.score:10.4f}{verdict}  {prediction.name}")
    seconds = time.perf_counter() - started
    network = {stage: 1000 * sum(p.timings.get(stage, 0.0) for p in predictions) / max(1, len(predictions))
               for stage in ("backbone", "search", "map")}
    print(f"wrote {Path(args.output) / 'scores.csv'}" + ("" if args.no_overlays else f" and {len(predictions)} overlays")
          + f": {len(predictions)} images in {seconds:.1f} s, {1000 * seconds / max(1, len(predictions)):.0f} ms per image "
          f"with reading and writing (network {network['backbone']:.0f}, search {network['search']:.0f}, "
          f"map {network['map']:.0f} ms)")
    if skipped.errors:
        print(f"error: {len(skipped.errors)} of {len(skipped.errors) + len(predictions)} images could not be read", file=sys.stderr)
        return 1
    return 0


def _run_on_ray(args: argparse.Namespace) -> int:
    from ..fleet.scoring import predict_on_ray

    if args.evidence:
        raise ValueError("--evidence is not available with --ray; run 'patchcore predict' without --ray for evidence")
    summary = predict_on_ray(args.model, args.inputs, args.output, address=args.ray or None, workers=args.workers,
                             cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size or 16,
                             overlays=not args.no_overlays)
    rate = summary["scored"] / summary["seconds"] if summary["seconds"] else 0.0
    print(f"{summary['images']} images: {summary['already_scored']} scored before, {summary['scored']} scored now "
          f"({rate:.1f} images/s), {summary['failed']} could not be read; results in {Path(args.output) / 'scores.csv'}")
    return 1 if summary["failed"] else 0
