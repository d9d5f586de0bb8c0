"""Does the neighbourhood average count the zero padding at the photo's border? (prints a table; not a test)

    python benchmarks/bench_border_pooling.py [--data bottle,macaroni1]

PatchCore's 3x3 neighbourhood average (``F.avg_pool2d`` with padding 1) counts, by torch's default
and in the paper's code, the zeros beyond the feature map's border: a patch on the photo's edge
averages 6 real values divided by 9 (a corner 4 / 9), so its features shrink towards zero. This
fits and evaluates the defaults (what ``patchcore evaluate`` measures) both ways, each in the same
run: ``count_include_pad=True`` (zeros counted) and ``False`` (only the real neighbours averaged).
Data: MVTec AD bottle and VisA macaroni1 from ../shared.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from patchcore import PatchCore
from patchcore.engine.features import PatchFeatures
from patchcore.evaluation.datasets import load_mvtec_category
from patchcore.evaluation.evaluate import evaluate_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = {"bottle": SHARED / "mvtec" / "bottle", "macaroni1": SHARED / "visa" / "macaroni1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bottle,macaroni1", help="comma-separated data sets (bottle, macaroni1)")
    args = parser.parse_args()
    print(f"{'data':10s} {'count_include_pad':>17s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'AUPRO':>6s} "
          f"{'seconds':>7s}", flush=True)
    for name in args.data.split(","):
        folder = DATA[name]
        dataset = load_mvtec_category(folder.parent, folder.name)
        for include in (True, False):
            PatchFeatures.count_include_pad = include
            started = time.perf_counter()
            result = evaluate_dataset(PatchCore(), dataset, None)
            print(f"{name:10s} {str(include):>17s} {100 * result['image_auroc']:11.2f} {100 * result['pixel_auroc']:11.2f} "
                  f"{100 * result['aupro']:6.2f} {time.perf_counter() - started:7.0f}", flush=True)
    PatchFeatures.count_include_pad = True


if __name__ == "__main__":
    main()
