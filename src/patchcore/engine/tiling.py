"""Patch features of network inputs of any size: in one pass, or tile by tile and stitched.

Tiling bounds the memory a large input needs and lets a photo be inspected at its native
resolution. Each patch of the stitched grid comes from the tile in which it lies most centrally
(:func:`patchcore.engine.geometry.tile_owner`), where the network saw the most context around
it, so the grid has no seams at the tiles' borders. Works with any network function on numpy
arrays: torch's (:mod:`.embedding`) or an exported ONNX graph (:mod:`.runtime`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .geometry import padded, tile_owner, tile_starts
from .onnx_network import OnnxNetwork

#: ``pixels (B, 3, H, W) -> patch features (B, H / cell, W / cell, width)``, float32 numpy.
NetworkFunction = Callable[[np.ndarray], np.ndarray]


class TiledEmbedding:
    """Patch features of whole inputs, tiling those larger than ``tile_size`` pixels.

    ``stride`` is the deepest feature stage's (inputs are multiples of it), ``cell`` the input
    pixels per patch. ``tile_size`` is rounded up to ``stride``; tiles share at least
    ``tile_overlap`` of their side; ``tile_batch`` tiles go through the network at once.
    """

    def __init__(self, network: NetworkFunction, stride: int, cell: int, tile_size: int | None = None,
                 tile_overlap: float = 0.25, tile_batch: int = 8) -> None:
        if tile_size is not None and tile_size < 32:
            raise ValueError(f"tile_size must be at least 32 pixels, got {tile_size}")
        if not 0.0 <= tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must lie in [0, 1), got {tile_overlap}")
        self.network = network
        self.stride = stride
        self.cell = cell
        self.tile_size = None if tile_size is None else padded(tile_size, stride)
        self.tile_overlap = tile_overlap
        self.tile_batch = max(1, tile_batch)

    def release_memory(self) -> None:
        """Hand back the memory the network keeps between runs, where it keeps any (ONNX Runtime's arena)."""
        if isinstance(self.network, OnnxNetwork):
            self.network.release_memory()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        height, width = pixels.shape[-2:]
        if self.tile_size is None or (height <= self.tile_size and width <= self.tile_size):
            return self.network(pixels)
        return self._tiled(pixels)

    def _tiled(self, pixels: np.ndarray) -> np.ndarray:
        batch, _, height, width = pixels.shape
        tile_height, tile_width = min(self.tile_size, height), min(self.tile_size, width)
        overlap = int(round(self.tile_overlap * self.tile_size))
        rows = tile_starts(height, tile_height, overlap, self.stride)
        cols = tile_starts(width, tile_width, overlap, self.stride)
        tiles = [(top, left) for top in rows for left in cols]
        crops = np.stack([pixels[b, :, top : top + tile_height, left : left + tile_width]
                          for b in range(batch) for top, left in tiles])
        parts = [self.network(np.ascontiguousarray(crops[i : i + self.tile_batch]))
                 for i in range(0, len(crops), self.tile_batch)]
        features = np.concatenate(parts).reshape(batch, len(rows), len(cols), *parts[0].shape[1:])
        grid_height, grid_width = height // self.cell, width // self.cell
        row_owner = tile_owner(grid_height, rows, tile_height // self.cell, self.cell)
        col_owner = tile_owner(grid_width, cols, tile_width // self.cell, self.cell)
        stitched = np.empty((batch, grid_height, grid_width, features.shape[-1]), dtype=features.dtype)
        for i, top in enumerate(rows):
            grid_rows = np.flatnonzero(row_owner == i)
            if grid_rows.size == 0:
                continue
            r0, r1 = int(grid_rows[0]), int(grid_rows[-1]) + 1
            for j, left in enumerate(cols):
                grid_cols = np.flatnonzero(col_owner == j)
                if grid_cols.size == 0:
                    continue
                c0, c1 = int(grid_cols[0]), int(grid_cols[-1]) + 1
                local_r, local_c = top // self.cell, left // self.cell
                stitched[:, r0:r1, c0:c1] = features[:, i, j, r0 - local_r : r1 - local_r, c0 - local_c : c1 - local_c]
        return stitched
