"""The network half of PatchCore as one torch module: backbone stages -> locally aware patch
features, ``pixels (B, 3, H, W) -> (B, H / cell, W / cell, width)``. Exported once per backbone
as an ONNX graph (:mod:`.network_cache`), which is what fits, saved models and exports run; the
torch module itself runs only on a GPU or with ``runtime="torch"``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbone_specs import BackboneSpec
from .backbones import Backbone, build_network, create_backbone, weights_file
from .features import PatchFeatures
from .geometry import InputTransform
from .network_cache import NetworkParts
from .onnx_network import export_network
from .tiling import TiledEmbedding
from .weights import load_into


class PatchNetwork(nn.Module):
    """A frozen backbone followed by :class:`PatchFeatures`."""

    def __init__(self, backbone: Backbone, patch_features: PatchFeatures) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_features = patch_features
        self.stride = max(backbone.strides)  # inputs are padded to a multiple of this
        self.cell = min(backbone.strides)  # input pixels per patch

    @property
    def width(self) -> int:
        return self.patch_features.width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.patch_features(self.backbone.network(pixels))

    def numpy(self, pixels: np.ndarray) -> np.ndarray:
        """The same on numpy arrays, without autograd."""
        with torch.inference_mode():
            return self(torch.from_numpy(pixels)).numpy()


def patch_network(spec: BackboneSpec, backbone: Backbone, feature_width: int | None, neighbourhood: int) -> PatchNetwork:
    """``backbone`` followed by patch features ``feature_width`` wide (``None``: the spec's default)."""
    width = feature_width if feature_width is not None else spec.feature_width
    return PatchNetwork(backbone, PatchFeatures(backbone.channels, width, neighbourhood)).eval()


def pretrained_network(spec: BackboneSpec, weights: str, feature_width: int | None, neighbourhood: int) -> PatchNetwork:
    """The patch network of ``spec`` with ``weights`` loaded (see :func:`~.backbones.create_backbone`)."""
    return patch_network(spec, create_backbone(spec, weights), feature_width, neighbourhood)


def network_from_arrays(spec: BackboneSpec, arrays: dict[str, np.ndarray], feature_width: int | None,
                        neighbourhood: int, source: str) -> PatchNetwork:
    """The patch network of ``spec`` with the backbone weights :func:`backbone_arrays` gave
    (``source`` names where they come from in errors)."""
    backbone = build_network(spec)
    load_into(backbone.network, {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}, source)
    return patch_network(spec, backbone, feature_width, neighbourhood)


def backbone_arrays(network: PatchNetwork) -> dict[str, np.ndarray]:
    """The backbone's weights as numpy arrays, as saved models keep them (batch-norm step
    counters only matter for training, and are 0-d, which numpy files widen)."""
    return {name: value.detach().cpu().numpy() for name, value in network.backbone.network.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def graph_parts(spec: BackboneSpec, network: PatchNetwork, weights: str, source: Path | None) -> NetworkParts:
    """What the network cache keeps of ``network``: its ONNX graph, backbone weights and geometry,
    with what it was made from (``source``: the weights file)."""
    import timm

    made_from = {"backbone": spec.name, "architecture": spec.architecture, "layers": list(spec.layers),
                 "feature_location": spec.feature_location, "weights": str(weights),
                 "weights_file": None if source is None else str(source), "neighbourhood": network.patch_features.neighbourhood,
                 "count_include_pad": network.patch_features.count_include_pad, "torch": torch.__version__,
                 "timm": timm.__version__}
    return NetworkParts(export_network(network), backbone_arrays(network), network.stride, network.cell,
                        tuple(network.backbone.channels), network.width, source, made_from, network)


def network_parts(spec: BackboneSpec, weights: str, feature_width: int | None, neighbourhood: int) -> NetworkParts:
    """Build the patch network of ``spec`` with ``weights`` (torch and timm) for the network cache."""
    network = pretrained_network(spec, weights, feature_width, neighbourhood)
    return graph_parts(spec, network, weights, weights_file(spec, weights))


def parts_from_arrays(spec: BackboneSpec, arrays: dict[str, np.ndarray], feature_width: int | None,
                      neighbourhood: int, source: str) -> NetworkParts:
    """As :func:`network_parts` for backbone weights given as arrays (a saved model's)."""
    network = network_from_arrays(spec, arrays, feature_width, neighbourhood, source)
    return graph_parts(spec, network, source, None)


def feature_pipeline(
    spec: BackboneSpec,
    backbone: Backbone,
    feature_width: int | None,
    neighbourhood: int,
    resize: int | tuple[int, int] | None,
    crop: int | None,
    tile_size: int | None = None,
    tile_overlap: float = 0.25,
    batch_size: int = 8,
) -> tuple[PatchNetwork, TiledEmbedding, InputTransform]:
    """The patch network, its (tiling) embedding function and the input transform for ``backbone``
    (``feature_width`` ``None``: the spec's default)."""
    network = patch_network(spec, backbone, feature_width, neighbourhood)
    embedding = TiledEmbedding(network.numpy, network.stride, network.cell, tile_size, tile_overlap, batch_size)
    return network, embedding, InputTransform(resize, crop, spec.mean, spec.std, stride=network.stride,
                                                cell=network.cell)
