"""Which efficientnet_lite0 features and input normalisation detect best? (prints a table; not a test)

    python benchmarks/lite0_choices.py [MVTEC_CATEGORY_DIR]

Fits and evaluates (the paper's protocol: shorter side 256, crop 224, coreset 10 %; pixel metrics
at full mask resolution) the block outputs and timm's "expansion" features, each with ImageNet
mean/std and with the [-1, 1] scaling the network was trained with. Default data: MVTec AD bottle
from ../shared. The registry's normalisation was chosen from this table (README, "Backbones").
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from patchcore import PRESETS, PatchCore
from patchcore.engine import backbone_specs
from patchcore.evaluation.datasets import load_mvtec_category
from patchcore.evaluation.evaluate import evaluate_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DATA
    dataset = load_mvtec_category(data.parent, data.name)
    base = backbone_specs.REGISTRY["efficientnet_lite0"]
    normalisations = {
        "ImageNet mean/std": (backbone_specs.IMAGENET_MEAN, backbone_specs.IMAGENET_STD),
        "[-1, 1] (as trained)": (backbone_specs.SYMMETRIC_MEAN, backbone_specs.SYMMETRIC_STD),
    }
    print(f"{'features':28s} {'normalisation':22s} {'width':>5s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'AUPRO':>6s} {'seconds':>7s}")
    for location, label in (("", "block outputs"), ("expansion", "expansion")):
        for name, (mean, std) in normalisations.items():
            variant = replace(base, name="efficientnet_lite0_variant", mean=mean, std=std, feature_location=location)
            backbone_specs.REGISTRY[variant.name] = variant
            started = time.perf_counter()
            result = evaluate_dataset(PatchCore(**{**PRESETS["paper"], "backbone": variant.name}), dataset, None)
            print(f"{label:28s} {name:22s} {result['feature_dim']:5d} {100 * result['image_auroc']:11.1f} "
                  f"{100 * result['pixel_auroc']:11.2f} {100 * result['aupro']:6.1f} {time.perf_counter() - started:7.0f}", flush=True)


if __name__ == "__main__":
    main()
