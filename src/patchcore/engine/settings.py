"""PatchCore's default settings and named presets, in one place, importable without torch.

The constructor of :class:`~patchcore.engine.model.PatchCore` takes its defaults from
:data:`DEFAULTS`; the command line, ``evaluate`` and the service read them from here, so what
``evaluate`` measures is what a user deploys.
"""

from __future__ import annotations

from typing import Any

from .backbone_specs import IMAGENET_WEIGHTS

#: The defaults were chosen by measurement on MVTec bottle (900x900, square) and VisA macaroni1
#: (750x500, small defects) within the speed limits (README, "Defaults"; docs/experiments.md).
DEFAULTS: dict[str, Any] = {
    "backbone": "efficientnet_lite2",
    "layers": None,
    "feature_width": None,
    "neighbourhood": 3,
    "coreset_ratio": 0.01,
    "max_bank_size": 40_000,
    "sampler": "greedy",
    "projection_dim": 128,
    "num_neighbours": 9,
    "reweight": True,
    "resize": 384,
    "crop": None,
    "tile_size": None,
    "tile_overlap": 0.25,
    "smoothing_sigma": 4.0,
    "weights": IMAGENET_WEIGHTS,
    "feature_location": None,
    "search_backend": "auto",
    "batch_size": 4,
    "seed": 0,
    "device": "auto",
    "runtime": "auto",
    "threads": None,
    "progress": False,
}

#: Where the network runs: ``auto`` = a GPU when torch sees one, else the CPU (with ONNX Runtime
#: when it is installed, which is 3-4x faster there than torch).
DEVICES = ("auto", "cpu", "cuda")
#: What runs the network on the CPU: ``auto`` = ONNX Runtime when it is installed, else torch.
RUNTIMES = ("auto", "onnxruntime", "torch")

#: Named settings one option away (``--preset``). ``paper``: the paper's MVTec AD protocol, shorter
#: side 256 and a centred 224x224 crop with a 10% memory bank searched exactly (on this project's
#: offline backbone, lite0), for figures comparable with the paper's and with earlier versions.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"backbone": "efficientnet_lite0", "resize": 256, "crop": 224, "coreset_ratio": 0.1, "max_bank_size": None,
              "search_backend": "numpy"},
}
