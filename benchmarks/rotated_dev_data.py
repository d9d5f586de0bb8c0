"""Turned copies of a category's test photos, for measuring parts that lie at any orientation (issue 18).

    python benchmarks/rotated_dev_data.py ../shared/data/mvtec/bottle /tmp/rotated/bottle_rot90 --kind rot90
    python benchmarks/rotated_dev_data.py ../shared/data/visa/macaroni1 /tmp/rotated/macaroni1_angle --kind angle

Writes an MVTec-layout category folder: ``train`` is a link to the source's ``train`` (the model
still learns from upright photos only), ``test/<type>/<stem>.png`` each test photo turned,
``ground_truth/<type>/<stem>_mask.png`` its mask turned the same way, and ``rotations.json``
saying what was done to each photo. Photos are written as PNG, so a photo turned by 0 degrees has
exactly the pixels of its source (JPEGs decoded once).

The test photos are taken in sorted order (defect type, then file name) and the turns drawn from
``numpy.random.default_rng(seed)`` (``--seed``, default 0), one draw per photo:

``--kind rot90``
    a random multiple of 90 degrees (``rng.integers(4)`` quarter turns counter-clockwise),
    exactly (``numpy.rot90``; the sides of non-square photos swap).

``--kind angle``
    a random angle, ``rng.uniform(0, 360)`` degrees counter-clockwise, about the photo's centre,
    as a part turned under a fixed camera: the canvas keeps the photo's size, its sides swapped
    when the angle is nearer 90 or 270 degrees than 0 or 180 (so a whole multiple of 90 degrees
    gives the same photo as ``rot90``). The photo is resampled bilinearly, the mask by nearest
    neighbour; the part of the turned photo that leaves the canvas is cut off, and the corners it
    leaves uncovered are filled with the photo's own background: its top-left block (an eighth of
    the shorter side; background in both MVTec bottle and VisA macaroni1), mirrored and tiled, and
    blended at the edge with the photo's bilinear coverage. A defective photo whose turned mask
    keeps less than half of its defect's pixels inside the canvas gets a new angle (next draw; the
    draws are recorded). On macaroni1 the pieces near the ends of the photo can leave the canvas at
    angles far from a multiple of 90 degrees, as a part at the edge of the frame would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def test_photos(source: Path) -> list[tuple[str, Path]]:
    """(defect type, path) of every test photo, in sorted order."""
    photos = []
    for folder in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        photos += [(folder.name, path) for path in sorted(folder.iterdir()) if path.suffix.lower() in SUFFIXES]
    return photos


def mask_of(source: Path, defect: str, path: Path) -> np.ndarray | None:
    """The photo's mask as booleans, or None (good photos have none)."""
    for name in (f"{path.stem}_mask.png", f"{path.stem}.png"):
        candidate = source / "ground_truth" / defect / name
        if candidate.is_file():
            with Image.open(candidate) as mask:
                return np.asarray(mask.convert("L")) > 127
    return None


def background(photo: np.ndarray, height: int, width: int) -> np.ndarray:
    """The photo's top-left block, mirrored and tiled over a ``height`` x ``width`` canvas."""
    side = max(4, min(photo.shape[:2]) // 8)
    block = photo[:side, :side]
    tile = np.concatenate([np.concatenate([block, block[:, ::-1]], axis=1),
                           np.concatenate([block[::-1], block[::-1, ::-1]], axis=1)], axis=0)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    return np.tile(tile, reps)[:height, :width]


def canvas_size(width: int, height: int, angle: float) -> tuple[int, int]:
    """(width, height) of the canvas of a photo turned by ``angle``: its own, or swapped when the
    angle is nearer 90 or 270 degrees."""
    return (height, width) if int(round(angle / 90.0)) % 2 else (width, height)


def affine(width: int, height: int, angle: float) -> tuple[float, ...]:
    """PIL's AFFINE data turning a ``width`` x ``height`` photo by ``angle`` degrees counter-clockwise
    about its centre onto the centre of its canvas (output -> input, pixel-edge coordinates)."""
    canvas_width, canvas_height = canvas_size(width, height, angle)
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return (cos, -sin, width / 2 - canvas_width / 2 * cos + canvas_height / 2 * sin,
            sin, cos, height / 2 - canvas_width / 2 * sin - canvas_height / 2 * cos)


def turn_by_angle(photo: np.ndarray, mask: np.ndarray | None, angle: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The photo (and mask) turned by ``angle`` degrees, as the module's docstring says."""
    height, width = photo.shape[:2]
    size = canvas_size(width, height, angle)
    data = affine(width, height, angle)
    turned = np.asarray(Image.fromarray(photo).transform(size, Image.AFFINE, data, resample=Image.BILINEAR),
                        dtype=np.float32)
    coverage = np.asarray(Image.new("L", (width, height), 255).transform(size, Image.AFFINE, data, resample=Image.BILINEAR,
                                                                          fillcolor=0), dtype=np.float32)[..., None] / 255.0
    # Where coverage is partial, PIL's bilinear blends the photo with black: undo that, then blend with the background.
    photo_part = np.where(coverage > 0, turned / np.maximum(coverage, 1e-6), 0.0)
    filled = photo_part * coverage + background(photo, size[1], size[0]) * (1.0 - coverage)
    turned_mask = None
    if mask is not None:
        turned_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).transform(
            size, Image.AFFINE, data, resample=Image.NEAREST, fillcolor=0)) > 127
    return np.clip(np.rint(filled), 0, 255).astype(np.uint8), turned_mask


def make(source: Path, out: Path, kind: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    train = out / "train"
    if not train.exists():
        os.symlink((source / "train").resolve(), train, target_is_directory=True)
    records = []
    for defect, path in test_photos(source):
        with Image.open(path) as opened:
            photo = np.asarray(opened.convert("RGB"))
        mask = mask_of(source, defect, path)
        record = {"file": f"test/{defect}/{path.stem}.png", "from": str(path.relative_to(source))}
        if kind == "rot90":
            turns = int(rng.integers(4))
            turned, turned_mask = np.rot90(photo, turns), None if mask is None else np.rot90(mask, turns)
            record["quarter_turns"] = turns
        else:
            draws = []
            while True:
                angle = float(rng.uniform(0.0, 360.0))
                draws.append(angle)
                turned, turned_mask = turn_by_angle(photo, mask, angle)
                if mask is None or not mask.any() or turned_mask.sum() >= 0.5 * mask.sum() or len(draws) >= 50:
                    break
            record.update({"angle": angle, "draws": draws, "canvas": list(canvas_size(photo.shape[1], photo.shape[0], angle))})
            if mask is not None and mask.any():
                record["defect_kept"] = round(float(turned_mask.sum() / mask.sum()), 4)
        target = out / record["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(turned)).save(target)
        if turned_mask is not None:
            mask_path = out / "ground_truth" / defect / f"{path.stem}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(turned_mask).astype(np.uint8) * 255).save(mask_path)
        records.append(record)
    manifest = {"source": str(source), "kind": kind, "seed": seed, "photos": records}
    (out / "rotations.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="an MVTec-layout category folder (train/good, test/<type>, ground_truth/<type>)")
    parser.add_argument("out", type=Path, help="the folder to write (an MVTec-layout category)")
    parser.add_argument("--kind", choices=("rot90", "angle"), required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = make(args.source, args.out, args.kind, args.seed)
    redrawn = sum(len(r.get("draws", [])) > 1 for r in manifest["photos"])
    print(f"{args.out}: {len(manifest['photos'])} test photos turned ({args.kind}, seed {args.seed}"
          + (f", {redrawn} angles drawn again" if args.kind == "angle" else "") + ")")


if __name__ == "__main__":
    main()
