"""Which efficientnet_lite0 features and input normalisation detect best? (prints a table; not a test)

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lite0_choices.py [MVTEC_CATEGORY_DIR]

Fits and evaluates (coreset 10 %, pixel metrics at full mask resolution) the block outputs and
timm's "expansion" features, each with ImageNet mean/std and with the [-1, 1] scaling the network
was trained with. Default data: MVTec AD bottle from ../shared. The registry's default was chosen
from this table (README, "Backbones").
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from patchcore import PatchCore, backbones
from patchcore.datasets import load_mvtec_category
from patchcore.evaluate import evaluate_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DATA
    dataset = load_mvtec_category(data.parent, data.name)
    base = backbones.REGISTRY["efficientnet_lite0"]
    normalisations = {
        "ImageNet mean/std": (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD),
        "[-1, 1] (as trained)": (backbones.SYMMETRIC_MEAN, backbones.SYMMETRIC_STD),
    }
    print(f"{'features':28s} {'normalisation':22s} {'width':>5s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'AUPRO':>6s} {'seconds':>7s}")
    for location, label in (("", "block outputs"), ("expansion", "expansion")):
        for name, (mean, std) in normalisations.items():
            variant = replace(base, name="efficientnet_lite0_variant", mean=mean, std=std, feature_location=location)
            backbones.REGISTRY[variant.name] = variant
            started = time.perf_counter()
            result = evaluate_dataset(PatchCore(backbone=variant.name, coreset_ratio=0.1), dataset, None)
            print(f"{label:28s} {name:22s} {result['feature_dim']:5d} {100 * result['image_auroc']:11.1f} "
                  f"{100 * result['pixel_auroc']:11.2f} {100 * result['aupro']:6.1f} {time.perf_counter() - started:7.0f}", flush=True)


if __name__ == "__main__":
    main()
