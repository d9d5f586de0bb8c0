"""``patchcore evaluate``: fit and test on MVTec AD categories or a plain folder layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_model_options, model_from_args, positive_int


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="fit and test on MVTec AD categories or your own folders; print AUROC/AUPRO as in the paper",
        description="For each data set: fit on the good training images, score the test images, and report image "
                    "AUROC (also per defect type), pixel AUROC, AUPRO, fit time, inference time and memory-bank size. "
                    "Writes metrics.json, metrics.csv and per data set overlays, ROC/PRO curves and report.html. "
                    "The model settings are the product's defaults unless options say otherwise.",
    )
    parser.add_argument("root", metavar="ROOT",
                        help="MVTec AD root folder, one category folder (with train/good), or a plain folder layout: "
                             "ROOT/good/ and one folder per defect type (masks optional, see --masks)")
    parser.add_argument("--category", dest="categories", action="extend", nargs="+", default=None, metavar="C",
                        help="MVTec categories to evaluate (default: every category under ROOT)")
    parser.add_argument("--train", default=None, metavar="DIR",
                        help="plain layout: the good training images (default: ROOT/train/, else a seeded split of ROOT/good/)")
    parser.add_argument("--masks", default=None, metavar="DIR",
                        help="plain layout: masks named <stem>.png or <stem>_mask.png, flat or in a folder per defect "
                             "type (default: ROOT/masks/ or ROOT/ground_truth/ when present)")
    parser.add_argument("--test-share", type=float, default=0.2,
                        help="plain layout without training images: share of ROOT/good/ held out for testing (default: 0.2)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for metrics and reports")
    parser.add_argument("--json", action="store_true", help="print only the JSON results to stdout (progress to stderr)")
    parser.add_argument("--eval-size", type=positive_int, default=None, metavar="N",
                        help="compute pixel metrics on maps and masks resized to N x N (default: every pixel of the photos)")
    add_model_options(parser, methods=True)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """0 when every data set was evaluated, 1 when any failed."""
    from ..evaluation.datasets import load_folder_layout, mvtec_categories
    from ..evaluation.evaluate import evaluate_categories, evaluate_datasets, is_plain_layout, resolve_root
    from ..evaluation.summary import format_table, json_default, mean_row, public_row

    if is_plain_layout(args.root):
        root = Path(args.root)
        loaders = [(root.resolve().name, lambda: load_folder_layout(root, args.train, args.masks, args.test_share))]
        rows = evaluate_datasets(loaders, lambda: model_from_args(args), Path(args.output), eval_size=args.eval_size)
    else:
        root, categories = resolve_root(args.root, args.categories)
        rows = evaluate_categories(root, categories or mvtec_categories(root), lambda: model_from_args(args),
                                   Path(args.output), eval_size=args.eval_size)
    if args.json:
        print(json.dumps([public_row(row) for row in rows] + [mean_row(rows)], indent=2, default=json_default))
    else:
        print(format_table(rows + [mean_row(rows)]))
        print(f"wrote {Path(args.output) / 'metrics.json'}, metrics.csv and a report.html per data set")
    return 1 if any(row.get("error") is not None for row in rows) else 0
