"""Locally aware patch features (paper, section 3.1).

Each chosen stage's map is averaged over a p x p neighbourhood (stride 1, zero padding), reduced
to its share of the target width by adaptive average pooling over channels, and the deeper maps
are bilinearly resized to the first stage's grid before all are concatenated.

All three steps are linear per pixel or per channel, so they commute: the channel reduction is
done first, on the smallest maps, which gives the same result as the paper's order for less work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .network_cache import COUNT_INCLUDE_PAD


def layer_widths(channels: list[int], feature_width: int | None) -> list[int]:
    """Width each layer is pooled to so that the concatenation is ``feature_width`` wide.

    The target is shared equally between layers; a layer narrower than its share keeps all its
    channels and leaves the rest to the others: channels are never inflated. ``None`` (or a
    target at least the sum of the channels) keeps every channel.
    """
    if feature_width is None or feature_width >= sum(channels):
        return list(channels)
    if feature_width < len(channels):
        raise ValueError(f"feature_width {feature_width} is smaller than the number of layers ({len(channels)})")
    widths = [0] * len(channels)
    remaining = feature_width
    order = sorted(range(len(channels)), key=lambda i: channels[i])
    for position, i in enumerate(order):
        share = remaining // (len(channels) - position)
        widths[i] = min(channels[i], share)
        remaining -= widths[i]
    return widths


def channel_pooling_matrix(in_channels: int, out_channels: int) -> torch.Tensor:
    """The ``(out, in)`` matrix of 1-D adaptive average pooling over channels."""
    identity = torch.eye(in_channels).unsqueeze(1)  # one-hot "signals" of length in_channels
    return F.adaptive_avg_pool1d(identity, out_channels).squeeze(1).T.contiguous()


class PatchFeatures(nn.Module):
    """Turns a backbone's stage maps into one ``(batch, height, width, width_out)`` patch-feature map."""

    #: Whether the neighbourhood average counts the zeros beyond the feature map's border (torch's
    #: default, and the paper's code): a border patch then averages 6 of 9 real values (a corner
    #: 4) scaled by 9. Measured against averaging only the real values on bottle and macaroni1
    #: (``benchmarks/bench_border_pooling.py``; README, "The method, and our choices"). Part of
    #: the network cache's key (:mod:`.network_cache`), where the default is declared.
    count_include_pad = COUNT_INCLUDE_PAD

    def __init__(self, channels: list[int], feature_width: int | None = None, neighbourhood: int = 3) -> None:
        super().__init__()
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be an odd number >= 1, got {neighbourhood}")
        self.neighbourhood = neighbourhood
        self.widths = layer_widths(channels, feature_width)
        # Buffers, so that they follow the module to another device and into an exported graph.
        self.pooled = [width != c for c, width in zip(channels, self.widths)]
        for i, (c, width) in enumerate(zip(channels, self.widths)):
            if width != c:
                self.register_buffer(f"pooling_{i}", channel_pooling_matrix(c, width), persistent=False)

    @property
    def pooling(self) -> list[torch.Tensor | None]:
        """Per stage, its ``(out, in)`` channel-pooling matrix, or ``None`` when it keeps every channel."""
        return [getattr(self, f"pooling_{i}") if pooled else None for i, pooled in enumerate(self.pooled)]

    @property
    def width(self) -> int:
        return sum(self.widths)

    def forward(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        grid = feature_maps[0].shape[-2:]
        parts = []
        for feature_map, pooling in zip(feature_maps, self.pooling):
            if pooling is not None:
                feature_map = torch.einsum("oc,bchw->bohw", pooling, feature_map)
            if self.neighbourhood > 1:
                feature_map = F.avg_pool2d(feature_map, self.neighbourhood, stride=1, padding=self.neighbourhood // 2,
                                           count_include_pad=self.count_include_pad)
            if feature_map.shape[-2:] != grid:
                feature_map = F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False)
            parts.append(feature_map)
        return torch.cat(parts, dim=1).permute(0, 2, 3, 1)
