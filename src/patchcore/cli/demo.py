"""``patchcore demo``: the whole job on real data that ships on PyPI (ELPV solar cells)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "demo", help="fit and test on real solar-cell images (ELPV, offline)",
        description="Fit on good ELPV solar cells (thresholds self-calibrated from them), score held-out good "
                    "and defective cells, print the image AUROC and the verdicts, and save a model ready to serve.")
    parser.add_argument("-o", "--output", default="demo-output", help="output folder (default: demo-output)")
    parser.add_argument("--train-images", type=int, default=200, help="good cells to fit on (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split (default: 0)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.demo import run_demo

    return run_demo(Path(args.output), n_train=args.train_images, seed=args.seed)
