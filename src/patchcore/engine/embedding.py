"""The network half of PatchCore as one torch module: backbone stages -> locally aware patch
features, ``pixels (B, 3, H, W) -> (B, H / cell, W / cell, width)``. It is what ``patchcore
export`` writes as an ONNX graph."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .backbone_specs import BackboneSpec
from .backbones import Backbone
from .features import PatchFeatures
from .geometry import InputTransform
from .tiling import TiledEmbedding


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
    width = feature_width if feature_width is not None else spec.feature_width
    network = PatchNetwork(backbone, PatchFeatures(backbone.channels, width, neighbourhood)).eval()
    embedding = TiledEmbedding(network.numpy, network.stride, network.cell, tile_size, tile_overlap, batch_size)
    return network, embedding, InputTransform(resize, crop, spec.mean, spec.std, stride=network.stride,
                                                cell=network.cell)
