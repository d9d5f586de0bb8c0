"""Shared fixtures: small generated images of a "product" with and without defects."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHARED = Path(__file__).resolve().parents[2] / "shared"
MVTEC_BOTTLE = SHARED / "data" / "mvtec" / "bottle"


def product_image(rng: np.random.Generator, size: int | tuple[int, int] = 64,
                  defect: tuple[int, int, int] | None = None) -> np.ndarray:
    """A woven-looking texture (the good product), ``size`` square or (height, width); ``defect`` =
    (row, col, side) paints a red blotch."""
    height, width = (size, size) if isinstance(size, int) else size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    texture = 0.5 + 0.25 * np.sin(x * 0.8 + phase[0]) * np.cos(y * 0.8 + phase[1])
    image = np.stack([texture, texture * 0.9 + 0.05, texture * 0.7 + 0.1], axis=-1)
    image += rng.normal(0, 0.02, image.shape)
    if defect is not None:
        row, col, side = defect
        image[row : row + side, col : col + side] = [0.9, 0.1, 0.1]
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def subtle_defect(image: np.ndarray, kind: str, row: int, col: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` with a subtle defect near (row, col), and its mask.

    ``scratch``: a thin diagonal line 40% darker; ``spot``: a soft round spot 30% darker;
    ``texture``: a patch where the weave runs at twice its frequency. None is saturated: a
    pipeline must compare local texture to see them.
    """
    height, width = image.shape[:2]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = image.astype(np.float32) / 255.0
    mask = np.zeros((height, width), bool)
    if kind == "scratch":
        for t in range(18):
            r, c = row + t, col + t
            out[r, c : c + 2] *= 0.6
            mask[r, c : c + 2] = True
    elif kind == "spot":
        distance = np.hypot(y - row, x - col)
        weight = np.clip(1.0 - distance / 7.0, 0.0, 1.0)
        out *= (1.0 - 0.3 * weight)[..., None]
        mask = distance < 6.0
    elif kind == "texture":
        region = (slice(row, row + 14), slice(col, col + 14))
        phase = rng.uniform(0, 2 * np.pi, size=2)
        texture = 0.5 + 0.25 * np.sin(x[region] * 1.6 + phase[0]) * np.cos(y[region] * 1.6 + phase[1])
        out[region] = np.stack([texture, texture * 0.9 + 0.05, texture * 0.7 + 0.1], axis=-1)
        mask[region] = True
    else:
        raise ValueError(kind)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8), mask


@pytest.fixture(scope="session")
def product_images(tmp_path_factory) -> dict[str, list[Path]]:
    """Folders of 12 good training images, 4 good and 4 defective test images (64x64 PNG)."""
    root = tmp_path_factory.mktemp("product")
    rng = np.random.default_rng(0)
    folders = {"train": root / "train", "good": root / "test_good", "defective": root / "test_defective"}
    for folder in folders.values():
        folder.mkdir()
    paths: dict[str, list[Path]] = {key: [] for key in folders}
    for i in range(12):
        paths["train"].append(folders["train"] / f"train_{i:02d}.png")
        Image.fromarray(product_image(rng)).save(paths["train"][-1])
    for i in range(4):
        paths["good"].append(folders["good"] / f"good_{i}.png")
        Image.fromarray(product_image(rng)).save(paths["good"][-1])
        paths["defective"].append(folders["defective"] / f"bad_{i}.png")
        Image.fromarray(product_image(rng, defect=(20 + 4 * i, 24, 14))).save(paths["defective"][-1])
    paths["root"] = [root]
    return paths


#: The engine's tests run on the smallest offline backbone; the real-data tests use the defaults.
FAST = dict(backbone="efficientnet_lite0", search_backend="numpy", max_bank_size=None)


def small_model_settings(**overrides):
    """Settings for a fast model on 64x64 images (efficientnet_lite0, offline weights)."""
    settings = dict(FAST, resize=64, crop=64, coreset_ratio=0.25, batch_size=4)
    settings.update(overrides)
    return settings


@pytest.fixture(scope="session")
def fitted_model(product_images):
    from patchcore import PatchCore

    return PatchCore(**small_model_settings()).fit(product_images["train"])


def bank_only_detector(bank: np.ndarray, **settings):
    """A detector over a bare bank (no network): what scoring does after the features; the
    search is exact (numpy) unless ``settings`` say otherwise."""
    from patchcore.engine.detector import Detector
    from patchcore.engine.settings import ModelSettings

    class BankOnly(Detector):
        def __init__(self) -> None:
            self.settings_ = ModelSettings(**{"search_backend": "numpy", **settings})
            self._set_memory_bank(bank)
            self._start_bank_state()

        def settings(self) -> ModelSettings:
            return self.settings_

    return BankOnly()
