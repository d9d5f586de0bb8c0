"""``patchcore experiment``: one of the paper's experiments (or ours) on one data set, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluation.experiments.options import EXPERIMENTS, ExperimentOptions
from .options import add_model_options, model_settings_from_args, names


def _floats(text: str) -> list[float]:
    return [float(x) for x in names(text)]


def _ints(text: str) -> list[int]:
    return [int(x) for x in names(text)]


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "experiment",
        help=f"run one of the paper's experiments ({', '.join(EXPERIMENTS)})",
        description="Run one experiment on one MVTec-style category. Writes OUT/results.csv, OUT/results.md, "
                    "OUT/<experiment>.png; finished cells are kept in OUT/cells.jsonl and skipped when the command "
                    "is run again (resume).",
    )
    defaults = ExperimentOptions()
    parser.add_argument("experiment", choices=EXPERIMENTS)
    parser.add_argument("root", metavar="ROOT", help="MVTec AD root folder, or one category folder (with train/good)")
    parser.add_argument("--category", default=None, help="category under ROOT (default: the first one)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the results")
    parser.add_argument("--eval-size", type=int, default=256, metavar="N",
                        help="pixel metrics on maps and masks resized to N x N; 0 = full resolution (default: 256)")
    parser.add_argument("--ratios", type=_floats, default=defaults.ratios, help="coreset/speed: coreset ratios")
    parser.add_argument("--layer-sets", default=None,
                        help="layers: comma-separated sets, stages joined by '+', e.g. blocks.2,blocks.4,blocks.2+blocks.4 "
                             "(default: single stages, adjacent pairs and triples)")
    parser.add_argument("--neighbourhoods", type=_ints, default=defaults.neighbourhoods,
                        help="layers: neighbourhood sizes p tried with the default layers")
    parser.add_argument("--backbones", type=names, default=defaults.backbones,
                        help="backbones: names; a+b+c is an ensemble of those backbones")
    parser.add_argument("--indexes", type=names, default=defaults.indexes, help="speed: exact, hnsw and/or ivfpq")
    parser.add_argument("--shots", type=_ints, default=defaults.shots, help="shots: numbers of training images")
    parser.add_argument("--seeds", type=int, default=defaults.seeds, help="shots: seeds per number of shots")
    parser.add_argument("--methods", type=names, default=defaults.methods, help="methods: detectors to compare")
    parser.add_argument("--sizes", type=names, default=defaults.sizes,
                        help="resolution: shorter sides of the network input ('none' = the photo's own size)")
    parser.add_argument("--geometries", type=names, default=defaults.geometries, help="resolution: whole, crop and/or tiled")
    parser.add_argument("--tile", type=int, default=defaults.tile, help="resolution: tile side in pixels for 'tiled'")
    parser.add_argument("--tile-overlap-share", dest="tile_overlap_share", type=float, default=defaults.tile_overlap,
                        help="resolution: share of a tile's side that neighbours overlap")
    add_model_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.model import PatchCore
    from ..evaluation.experiments import build_spec, run_experiment
    from ..evaluation.experiments.tables import format_text_table, table_rows

    options = ExperimentOptions(
        ratios=args.ratios,
        layer_sets=[[x for x in group.split("+") if x] for group in names(args.layer_sets)] if args.layer_sets else None,
        neighbourhoods=args.neighbourhoods, backbones=args.backbones, indexes=args.indexes, shots=args.shots,
        seeds=args.seeds, methods=args.methods, sizes=args.sizes, geometries=args.geometries, tile=args.tile,
        tile_overlap=args.tile_overlap_share,
    )
    base = PatchCore(**model_settings_from_args(args)).get_params()
    base["progress"] = False
    rows, _ = run_experiment(args.experiment, args.root, args.category, args.output, options, base,
                             args.eval_size or None, command=" ".join(sys.argv))
    spec = build_spec(args.experiment, options, base)
    print(format_text_table(*table_rows(spec.name, spec.columns, rows)))
    print(f"wrote {Path(args.output) / 'results.csv'}, results.md and {spec.name}.png")
    return 0
