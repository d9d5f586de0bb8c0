"""Patch features of network inputs of any size: in one pass, or tile by tile and stitched.

Tiling bounds the memory a large input needs and lets a photo be inspected at its native
resolution. Each patch of the stitched grid comes from the tile in which it lies most centrally
(:func:`patchcore.geometry.tile_owner`), where the network saw the most context around it, so
the grid has no seams at the tiles' borders.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone_specs import BackboneSpec
from .backbones import Backbone
from .features import PatchFeatures
from .geometry import InputTransform, padded, tile_owner, tile_starts
from .images import ImageSource, LoadedBatch, iterate_batches
from .prediction import ErrorHandler


class PatchEmbedder:
    """``pixels (B, 3, H, W) -> patch features (B, H / cell, W / cell, width)``.

    ``tile_size`` (input pixels, rounded up to the deepest stride) splits inputs larger than it
    into square tiles that share at least ``tile_overlap`` of their side; ``None`` runs every
    input whole. ``tile_batch`` tiles go through the network at once.
    """

    def __init__(self, backbone: Backbone, patch_features: PatchFeatures, tile_size: int | None = None,
                 tile_overlap: float = 0.25, tile_batch: int = 8) -> None:
        if tile_size is not None and tile_size < 32:
            raise ValueError(f"tile_size must be at least 32 pixels, got {tile_size}")
        if not 0.0 <= tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must lie in [0, 1), got {tile_overlap}")
        self.backbone = backbone
        self.patch_features = patch_features
        self.stride = max(backbone.strides)
        self.cell = min(backbone.strides)
        self.tile_size = None if tile_size is None else padded(tile_size, self.stride)
        self.tile_overlap = tile_overlap
        self.tile_batch = max(1, tile_batch)

    @property
    def width(self) -> int:
        return self.patch_features.width

    def __call__(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            pixels = torch.as_tensor(pixels)
            height, width = pixels.shape[-2:]
            if self.tile_size is None or (height <= self.tile_size and width <= self.tile_size):
                return self.patch_features(self.backbone(pixels))
            return self._tiled(pixels)

    def _tiled(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixels.shape
        tile_height, tile_width = min(self.tile_size, height), min(self.tile_size, width)
        overlap = int(round(self.tile_overlap * self.tile_size))
        rows = tile_starts(height, tile_height, overlap, self.stride)
        cols = tile_starts(width, tile_width, overlap, self.stride)
        tiles = [(top, left) for top in rows for left in cols]
        crops = torch.stack([pixels[b, :, top : top + tile_height, left : left + tile_width]
                             for b in range(batch) for top, left in tiles])
        parts = [self.patch_features(self.backbone(crops[i : i + self.tile_batch]))
                 for i in range(0, len(crops), self.tile_batch)]
        features = torch.cat(parts).view(batch, len(rows), len(cols), *parts[0].shape[1:])
        grid_height, grid_width = height // self.cell, width // self.cell
        row_owner = tile_owner(grid_height, rows, tile_height // self.cell, self.cell)
        col_owner = tile_owner(grid_width, cols, tile_width // self.cell, self.cell)
        stitched = features.new_empty(batch, grid_height, grid_width, features.shape[-1])
        for i, top in enumerate(rows):
            grid_rows = (row_owner == i).nonzero()[0]
            if grid_rows.size == 0:
                continue
            r0, r1 = int(grid_rows[0]), int(grid_rows[-1]) + 1
            for j, left in enumerate(cols):
                grid_cols = (col_owner == j).nonzero()[0]
                if grid_cols.size == 0:
                    continue
                c0, c1 = int(grid_cols[0]), int(grid_cols[-1]) + 1
                local_r, local_c = top // self.cell, left // self.cell
                stitched[:, r0:r1, c0:c1] = features[:, i, j, r0 - local_r : r1 - local_r, c0 - local_c : c1 - local_c]
        return stitched


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
) -> tuple[PatchEmbedder, InputTransform]:
    """The patch embedder and the input transform for ``backbone`` (width ``None``: the spec's default)."""
    width = feature_width if feature_width is not None else spec.feature_width
    embedder = PatchEmbedder(backbone, PatchFeatures(backbone.channels, width, neighbourhood), tile_size, tile_overlap, batch_size)
    return embedder, InputTransform(resize, crop, spec.mean, spec.std, stride=embedder.stride)


def embed_batches(
    sources: list[ImageSource],
    transform: InputTransform,
    embedder: PatchEmbedder,
    batch_size: int,
    *,
    description: str = "features",
    progress: bool = False,
    on_error: ErrorHandler | None = None,
    keep_images: bool = False,
) -> Iterator[tuple[LoadedBatch, torch.Tensor]]:
    """Decode, transform and embed ``sources`` batch by batch: ``(batch, patch features (B, H, W, D))``."""
    batches = iterate_batches(sources, transform, batch_size, on_error=on_error, keep_images=keep_images)
    with tqdm(total=len(sources), desc=description, unit="img", disable=not progress) as bar:
        for batch in batches:
            yield batch, embedder(batch.pixels)
            bar.update(len(batch.names))
