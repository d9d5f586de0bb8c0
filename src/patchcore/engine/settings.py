"""PatchCore's settings as one typed record, its defaults and named presets, importable without torch.

:class:`ModelSettings` is what every model carries and what saved models and exports write and
read (``patchcore.json``, ``"settings"``): one record, so a setting cannot silently fall back to
another value in one of them. The constructor of :class:`~patchcore.engine.model.PatchCore`
takes its defaults from :data:`DEFAULTS` (the record's defaults); the command line,
``evaluate`` and the service read them from here, so what ``evaluate`` measures is what a user
deploys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .backbone_specs import IMAGENET_WEIGHTS


@dataclass(frozen=True)
class ModelSettings:
    """Every setting of a PatchCore model (see :class:`~patchcore.engine.model.PatchCore` for each).

    The defaults were chosen by measurement on MVTec bottle (900x900, square) and VisA macaroni1
    (750x500, small defects) within the speed limits (README, "Defaults"; docs/experiments.md).
    """

    backbone: str = "efficientnet_lite2"
    layers: tuple[str, ...] | None = None
    feature_width: int | None = None
    neighbourhood: int = 3
    coreset_ratio: float = 0.01
    max_bank_size: int | None = 40_000
    sampler: str = "greedy"
    projection_dim: int = 128
    num_neighbours: int = 9
    reweight: bool = True
    aggregation: str = "max"
    resize: int | tuple[int, int] | None = 384
    crop: int | None = None
    augment: str = "none"
    tile_size: int | None = None
    tile_overlap: float = 0.25
    smoothing_sigma: float = 4.0
    weights: str = IMAGENET_WEIGHTS
    feature_location: str | None = None
    network_precision: str = "float32"
    search_backend: str = "auto"
    calibration: str = "self"
    calibration_photos: int | None = 50
    max_fpr: float = 0.01
    max_pixel_fpr: float = 0.001
    batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    runtime: str = "auto"
    threads: int | None = None
    scratch_dir: str | None = None
    progress: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ModelSettings":
        """The record of a model's parameters (lists become tuples, paths strings)."""
        values = dict(params)
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        if isinstance(values.get("resize"), list):
            values["resize"] = tuple(values["resize"])
        for key in ("weights", "scratch_dir"):
            if values.get(key) is not None:
                values[key] = str(values[key])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (tuples as lists), every field present."""
        values = asdict(self)
        for key in ("layers", "resize"):
            if isinstance(values[key], tuple):
                values[key] = list(values[key])
        return values

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "ModelSettings":
        """The record written by :meth:`to_json`; ``where`` names the file in error messages.
        Every field must be present and no other: a model never guesses a setting."""
        known = {field.name for field in fields(cls)}
        missing, unknown = sorted(known - set(data)), sorted(set(data) - known)
        if missing or unknown:
            problems = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown else [])
            raise ValueError(f"{where}: settings do not match this patchcore ({'; '.join(problems)})")
        return cls.from_params(data)

    def replace(self, **changes: Any) -> "ModelSettings":
        return replace(self, **changes)


#: The defaults of every setting, by name (the constructor's and the command line's).
DEFAULTS: dict[str, Any] = {field.name: field.default for field in fields(ModelSettings)}

#: Where the network runs: ``auto`` = a GPU when torch sees one, else the CPU (with ONNX Runtime
#: when it is installed, which is 3-4x faster there than torch).
DEVICES = ("auto", "cpu", "cuda")
#: What runs the network on the CPU: ``auto`` = ONNX Runtime when it is installed, else torch.
RUNTIMES = ("auto", "onnxruntime", "torch")
#: What the network computes in: ``float32``, or ``int8`` (ONNX Runtime's static quantisation of the
#: float graph, calibrated on training photos: :mod:`.quantization`; CPU and ONNX Runtime only).
PRECISIONS = ("float32", "int8")

#: Named settings one option away (``--preset``). ``paper``: the paper's MVTec AD protocol, shorter
#: side 256 and a centred 224x224 crop with a 10% memory bank searched exactly (on this project's
#: offline backbone, lite0), for figures comparable with the paper's and with earlier versions.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"backbone": "efficientnet_lite0", "resize": 256, "crop": 224, "coreset_ratio": 0.1, "max_bank_size": None,
              "search_backend": "numpy"},
}

#: Settings that only say where and how a model runs, not what it computes: a model file that
#: lacks one loses nothing by taking the default.
RUNNING_SETTINGS = ("device", "runtime", "threads", "scratch_dir", "progress", "batch_size")


#: Settings added in format version 4 (issue 18), with the value that reproduces what a model
#: written before them did: it was fitted on its photos only (no turned or mirrored copies) and
#: scored each image by its largest patch score (eq. 7 re-weighted when ``reweight``).
ADDED_IN_FORMAT_4: dict[str, Any] = {"augment": "none", "aggregation": "max"}
#: Settings added in format version 5 (issue 17), likewise: a model written before it ran its
#: network in float32.
ADDED_IN_FORMAT_5: dict[str, Any] = {"network_precision": "float32"}
#: Settings added in format version 6 (issue 21), likewise: a model written before it was not
#: calibrated at fit (its thresholds, if any, came from held-out photos or by hand, and are kept).
ADDED_IN_FORMAT_6: dict[str, Any] = {"calibration": "none", "calibration_photos": None, "max_fpr": 0.01,
                                     "max_pixel_fpr": 0.001}
#: Every setting added since format 3, with the values that reproduce the models written before it.
ADDED_SINCE_FORMAT_3: dict[str, Any] = {**ADDED_IN_FORMAT_4, **ADDED_IN_FORMAT_5, **ADDED_IN_FORMAT_6}


def read_settings(data: dict[str, Any], where: str, format_version: int) -> tuple[ModelSettings, tuple[str, ...]]:
    """The settings of a model file of any readable format version, and the names of the settings
    that affect results but that the file did not record.

    From format version 6 every setting is recorded and nothing is guessed. Formats 3 to 5
    recorded every setting of their time, strictly too (all present, none unknown), and take the
    settings added since (:data:`ADDED_IN_FORMAT_4`, :data:`ADDED_IN_FORMAT_5`,
    :data:`ADDED_IN_FORMAT_6`) at the values that reproduce what the model did, not at today's
    defaults. Older exports kept only what scoring
    needs (not the coreset's ratio, projection or seed, which teach-in needs): those are returned
    as unrecorded, so that teach-in can refuse to guess them. The search back end that older files
    call ``torch`` (numpy's BLAS, always) is ``numpy``.
    """
    if format_version >= 6:
        return ModelSettings.from_json(data, where), ()
    if format_version in (3, 4, 5):
        added = {**ADDED_IN_FORMAT_6, **(ADDED_IN_FORMAT_5 if format_version <= 4 else {}),
                 **(ADDED_IN_FORMAT_4 if format_version == 3 else {})}
        unknown = sorted(set(added) & set(data))
        if unknown:
            raise ValueError(f"{where}: settings do not match this patchcore (unknown {', '.join(unknown)} in a "
                             f"format {format_version} file)")
        return ModelSettings.from_json({**data, **added}, where), ()
    values = {key: value for key, value in data.items() if key in DEFAULTS and key not in ADDED_SINCE_FORMAT_3}
    values.update(ADDED_SINCE_FORMAT_3)
    if values.get("search_backend") == "torch":
        values["search_backend"] = "numpy"
    unrecorded = [name for name in DEFAULTS if name not in values]
    values.update({name: DEFAULTS[name] for name in unrecorded})
    return ModelSettings.from_json(values, where), tuple(name for name in unrecorded if name not in RUNNING_SETTINGS)
