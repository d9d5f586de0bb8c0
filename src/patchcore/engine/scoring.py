"""From patch distances to an image score (paper, eq. 7) and a full-size anomaly map."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .geometry import Placement
from .search import MemoryBankIndex


def reweighted_image_score(
    patch_scores: np.ndarray,
    nearest: np.ndarray,
    patch_features: np.ndarray,
    index: MemoryBankIndex,
    num_neighbours: int = 9,
) -> float:
    """The paper's eq. 7: the largest patch score, scaled down when its nearest bank vector
    ``m*`` lies in a dense part of the bank (the test patch is about as close to ``m*``'s
    ``num_neighbours`` bank neighbours as to ``m*`` itself), up when it is isolated.

    ``patch_scores`` (P,) are distances to the nearest bank vectors ``nearest`` (P,);
    ``patch_features`` (P, D) are the test patches.
    """
    worst = int(np.argmax(patch_scores))
    best_score = float(patch_scores[worst])
    if num_neighbours <= 1 or index.size < 2:
        return best_score
    matched = int(nearest[worst])
    _, neighbours = index.search(index.memory_bank[matched : matched + 1], num_neighbours)
    neighbours = neighbours[0]
    if matched not in neighbours:  # ties between duplicate bank vectors
        neighbours = np.concatenate([[matched], neighbours[:-1]])
    distances = np.linalg.norm(index.memory_bank[neighbours] - patch_features[worst], axis=1)
    distances[neighbours == matched] = best_score  # identical up to rounding; keep it exact
    softmax = np.exp(distances - distances.max())
    weight = 1.0 - softmax[np.flatnonzero(neighbours == matched)[0]] / softmax.sum()
    return weight * best_score


def network_map(patch_scores: np.ndarray, placement: Placement, sigma: float = 4.0) -> np.ndarray:
    """Patch-score grid -> smoothed map at network resolution over the part of the input that
    shows the photo (padding cut off), float32.

    As the paper: bilinear upsampling to the network input, Gaussian smoothing with ``sigma``
    input pixels. Its values are distributed as the full-size map's (which only resizes it), so
    pixel thresholds are calibrated on it at a fraction of the cost.
    """
    grid = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))[None, None]
    upsampled = F.interpolate(grid, size=placement.input_size, mode="bilinear", align_corners=False)[0, 0].numpy()
    smoothed = gaussian_filter(upsampled, sigma=sigma) if sigma > 0 else upsampled
    content_height, content_width = placement.content_size
    return np.ascontiguousarray(smoothed[:content_height, :content_width])


def anomaly_map(patch_scores: np.ndarray, placement: Placement, sigma: float = 4.0) -> np.ndarray:
    """Patch-score grid -> anomaly map over every pixel of the original photo, float32 (height, width).

    The map at network resolution (:func:`network_map`) is resized once, bilinearly, onto the
    region of the photo the input showed. Outside that region (only with a centre crop) the
    border values extend: the network did not see it.
    """
    smoothed = network_map(patch_scores, placement, sigma)
    height, width = placement.image_size
    # The box in whole original pixels (at most half a pixel off), clipped to the image.
    box_left, box_top, box_right, box_bottom = placement.box
    left, right = max(0, round(box_left)), min(width, max(round(box_right), round(box_left) + 1))
    top, bottom = max(0, round(box_top)), min(height, max(round(box_bottom), round(box_top) + 1))
    if (bottom - top, right - left) == smoothed.shape:
        inside = smoothed
    else:
        inside = F.interpolate(
            torch.from_numpy(smoothed)[None, None], size=(bottom - top, right - left), mode="bilinear", align_corners=False
        )[0, 0].numpy()
    if (top, left, bottom, right) == (0, 0, height, width):
        return inside
    return np.pad(inside, ((top, height - bottom), (left, width - right)), mode="edge")
