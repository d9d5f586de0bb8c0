"""Data set loading: MVTec AD layout and plain folders, on small generated trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.evaluation.datasets import (
    Dataset,
    TestSample,
    check_image_file,
    load_folder_dataset,
    load_folder_layout,
    load_mask,
    load_mvtec_category,
    mvtec_categories,
)
from patchcore.errors import ImageLoadError

SHARED = Path(__file__).resolve().parents[2] / "shared"
MVTEC_BOTTLE = SHARED / "data" / "mvtec" / "bottle"

H, W = 12, 16  # every generated image is 16 wide, 12 high
RNG = np.random.default_rng(0)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


def rgb(height: int = H, width: int = W) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def mask_array(value: int = 255, dtype=np.uint8) -> np.ndarray:
    mask = np.zeros((H, W), dtype)
    mask[2:5, 3:9] = value
    return mask


def make_mvtec(root: Path, category: str = "widget") -> Path:
    """A small MVTec-style category with every supported kind of image file."""
    folder = root / category
    train = folder / "train" / "good"
    save(train / "000.png", rgb())
    save(train / "001.JPG", rgb())  # upper-case suffix
    save(train / "002.tif", (RNG.integers(0, 65536, (H, W))).astype(np.uint16))  # 16-bit TIFF
    save(train / "003.png", RNG.integers(0, 256, (H, W, 4), dtype=np.uint8))  # RGBA
    save(train / "004.bmp", RNG.integers(0, 256, (H, W), dtype=np.uint8))  # grayscale
    save(train / "005.jpeg", rgb(), mode="L")  # grayscale JPEG
    (train / "readme.txt").write_text("not an image, ignored")
    save(folder / "test" / "good" / "000.png", rgb())
    save(folder / "test" / "good" / "001.png", rgb())
    save(folder / "test" / "scratch" / "000.png", rgb())
    save(folder / "test" / "scratch" / "001.jpg", rgb())
    save(folder / "test" / "crack" / "000.tiff", (RNG.integers(0, 65536, (H, W))).astype(np.uint16))
    save(folder / "ground_truth" / "scratch" / "000_mask.png", mask_array(255))
    save(folder / "ground_truth" / "scratch" / "001_mask.png", mask_array(253))
    save(folder / "ground_truth" / "crack" / "000_mask.png", mask_array(254))
    return folder


def test_mvtec_category_samples_labels_and_masks(tmp_path):
    folder = make_mvtec(tmp_path)
    (tmp_path / "not_a_category").mkdir()
    assert mvtec_categories(tmp_path) == ["widget"]

    data = load_mvtec_category(tmp_path, "widget")
    assert isinstance(data, Dataset) and data.name == "widget" and data.skipped == []
    assert [p.name for p in data.train] == ["000.png", "001.JPG", "002.tif", "003.png", "004.bmp", "005.jpeg"]
    summary = [(s.path.name, s.label, s.defect_type, s.mask_path and s.mask_path.name) for s in data.test]
    assert summary == [
        ("000.tiff", 1, "crack", "000_mask.png"),
        ("000.png", 0, "good", None),
        ("001.png", 0, "good", None),
        ("000.png", 1, "scratch", "000_mask.png"),
        ("001.jpg", 1, "scratch", "001_mask.png"),
    ]
    assert data.test[0].mask_path == folder / "ground_truth" / "crack" / "000_mask.png"
    assert data.has_masks


def test_class_code_masks_read_as_anomalous(tmp_path):
    make_mvtec(tmp_path)
    data = load_mvtec_category(tmp_path, "widget")
    expected = mask_array(1).astype(bool)
    for sample in data.test:
        mask = load_mask(sample)
        assert mask.dtype == bool and mask.shape == (H, W)
        assert np.array_equal(mask, expected if sample.label else np.zeros((H, W), bool)), sample.path
    # With the size given, the image is not opened at all.
    good = TestSample(tmp_path / "missing.png", 0, "good")
    assert load_mask(good, (5, 7)).shape == (5, 7) and not load_mask(good, (5, 7)).any()


@pytest.mark.parametrize(
    "name, array, mode",
    [
        ("codes.png", np.array([[0, 253, 254, 255]], np.uint8), None),
        ("deep.png", np.array([[0, 1, 300, 65535]], np.uint16), None),  # 16-bit: 1 is not lost
        ("bits.png", np.array([[0, 255, 255, 255]], np.uint8), "1"),
        ("palette.png", np.array([[0, 253, 254, 255]], np.uint8), "P"),
        ("rgb.png", np.array([[[0, 0, 0], [9, 0, 0], [0, 9, 0], [0, 0, 9]]], np.uint8), None),
        ("alpha.png", np.array([[[0, 0, 0, 255], [255, 0, 0, 255], [0, 1, 0, 0], [0, 0, 255, 255]]], np.uint8), None),
    ],
)
def test_any_nonzero_mask_value_is_anomalous(tmp_path, name, array, mode):
    mask_path = save(tmp_path / name, array, mode)
    sample = TestSample(tmp_path / "image.png", 1, "x", mask_path)
    assert load_mask(sample, (1, 4)).tolist() == [[False, True, True, True]]


def test_mask_size_mismatch_names_both_files(tmp_path):
    mask_path = save(tmp_path / "m_mask.png", np.zeros((5, 5), np.uint8))
    image_path = save(tmp_path / "m.png", rgb())
    sample = TestSample(image_path, 1, "x", mask_path)
    with pytest.raises(ImageLoadError, match=r"m_mask\.png: mask is 5x5 pixels but its image .*m\.png is 16x12"):
        load_mask(sample)
    with pytest.raises(ImageLoadError, match="defective image has no ground-truth mask"):
        load_mask(TestSample(image_path, 1, "x"))


# --- MVTec errors -------------------------------------------------------------------------


def test_missing_root_and_category(tmp_path):
    with pytest.raises(ImageLoadError, match="nowhere: MVTec root folder not found"):
        load_mvtec_category(tmp_path / "nowhere", "widget")
    with pytest.raises(ImageLoadError, match="nowhere"):
        mvtec_categories(tmp_path / "nowhere")
    with pytest.raises(ImageLoadError, match="holds no MVTec categories"):
        mvtec_categories(tmp_path)
    make_mvtec(tmp_path)
    with pytest.raises(ImageLoadError, match="gadget: no such MVTec category.*found: widget"):
        load_mvtec_category(tmp_path, "gadget")


def test_empty_and_missing_folders(tmp_path):
    folder = make_mvtec(tmp_path)
    for path in (folder / "test" / "crack").iterdir():
        path.unlink()
    with pytest.raises(ImageLoadError, match=r"crack: folder holds no images"):
        load_mvtec_category(tmp_path, "widget")
    for path in (folder / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(ImageLoadError, match=r"good: folder holds no images"):
        load_mvtec_category(tmp_path, "widget")


def test_missing_test_folder(tmp_path):
    folder = tmp_path / "widget"
    save(folder / "train" / "good" / "a.png", rgb())
    with pytest.raises(ImageLoadError, match=r"test: test folder not found"):
        load_mvtec_category(tmp_path, "widget")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_image_is_named(tmp_path, damage):
    folder = make_mvtec(tmp_path)
    bad = folder / "train" / "good" / "000.png"
    data = bad.read_bytes()
    damaged = {"garbage": b"definitely not a png" * 10, "truncated": data[: len(data) // 2], "empty": b""}
    bad.write_bytes(damaged[damage])
    with pytest.raises(ImageLoadError, match=r"000\.png: (not an image file|corrupt or truncated)"):
        load_mvtec_category(tmp_path, "widget")


def test_missing_mask_is_named(tmp_path):
    folder = make_mvtec(tmp_path)
    (folder / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(ImageLoadError, match=r"001\.jpg: no ground-truth mask; expected .*001_mask\.png"):
        load_mvtec_category(tmp_path, "widget")


def test_mask_size_mismatch_at_load_names_both(tmp_path):
    folder = make_mvtec(tmp_path)
    save(folder / "ground_truth" / "crack" / "000_mask.png", np.zeros((H, W + 1), np.uint8))
    with pytest.raises(ImageLoadError, match=r"000_mask\.png: mask is 17x12 pixels but its image .*000\.tiff is 16x12"):
        load_mvtec_category(tmp_path, "widget")


def test_corrupt_mask_is_named(tmp_path):
    folder = make_mvtec(tmp_path)
    (folder / "ground_truth" / "crack" / "000_mask.png").write_bytes(b"junk")
    with pytest.raises(ImageLoadError, match=r"000_mask\.png: not an image file"):
        load_mvtec_category(tmp_path, "widget")


def test_skip_bad_skips_warns_and_records(tmp_path):
    folder = make_mvtec(tmp_path)
    (folder / "train" / "good" / "000.png").write_bytes(b"junk")
    (folder / "test" / "good" / "001.png").write_bytes(b"junk")
    (folder / "ground_truth" / "scratch" / "001_mask.png").unlink()
    save(folder / "ground_truth" / "crack" / "000_mask.png", np.zeros((3, 3), np.uint8))
    with pytest.warns(UserWarning) as caught:
        data = load_mvtec_category(tmp_path, "widget", skip_bad=True)
    assert len(data.train) == 5 and len(data.test) == 2
    skipped = {path.relative_to(folder).as_posix(): reason for path, reason in data.skipped}
    assert set(skipped) == {"train/good/000.png", "test/good/001.png", "test/scratch/001.jpg", "test/crack/000.tiff"}
    assert "not an image file" in skipped["train/good/000.png"]
    assert "no ground-truth mask" in skipped["test/scratch/001.jpg"]
    assert "000_mask.png: mask is 3x3" in skipped["test/crack/000.tiff"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4 and all(m.startswith("skipping ") for m in messages)
    assert data.has_masks


def test_skip_bad_still_fails_when_nothing_is_left(tmp_path):
    folder = make_mvtec(tmp_path)
    for path in (folder / "train" / "good").iterdir():
        path.write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ImageLoadError, match="no readable images left"):
        load_mvtec_category(tmp_path, "widget", skip_bad=True)


def test_check_image_file(tmp_path):
    assert check_image_file(save(tmp_path / "a.png", rgb(7, 9))) == (7, 9)
    with pytest.raises(ImageLoadError, match="gone.png: file not found"):
        check_image_file(tmp_path / "gone.png")


# --- plain folders ------------------------------------------------------------------------


def make_folders(root: Path) -> dict[str, Path]:
    folders = {key: root / key for key in ("train", "good", "bad", "masks")}
    for i in range(3):
        save(folders["train"] / f"t{i}.png", rgb())
    save(folders["good"] / "g0.jpg", rgb())
    for stem in ("a", "b", "c"):
        save(folders["bad"] / f"{stem}.png", rgb())
    save(folders["masks"] / "a.png", mask_array(255))
    save(folders["masks"] / "b_mask.png", mask_array(1))
    save(folders["masks"] / "c.bmp", mask_array(255))
    save(folders["masks"] / "unrelated.png", mask_array(255))  # matches no image: ignored
    return folders


def test_folder_dataset_pairs_masks_by_stem(tmp_path):
    f = make_folders(tmp_path)
    data = load_folder_dataset(f["train"], f["good"], f["bad"], f["masks"])
    assert data.name == "train" and len(data.train) == 3 and data.skipped == []
    summary = [(s.path.name, s.label, s.defect_type, s.mask_path and s.mask_path.name) for s in data.test]
    assert summary == [
        ("g0.jpg", 0, "good", None),
        ("a.png", 1, "bad", "a.png"),
        ("b.png", 1, "bad", "b_mask.png"),
        ("c.png", 1, "bad", "c.bmp"),
    ]
    assert data.has_masks
    assert all(load_mask(s).sum() == (18 if s.label else 0) for s in data.test)


def test_folder_dataset_allows_defective_images_without_masks(tmp_path):
    f = make_folders(tmp_path)
    (f["masks"] / "c.bmp").unlink()
    with pytest.warns(UserWarning, match=r"1 defective image\(s\) have no mask .*c\.png"):
        data = load_folder_dataset(f["train"], f["good"], f["bad"], f["masks"], name="parts")
    assert data.name == "parts" and not data.has_masks
    assert [s.mask_path is None for s in data.test] == [True, False, False, True]
    no_masks = load_folder_dataset(f["train"], test_defective=f["bad"])
    assert not no_masks.has_masks and len(no_masks.test) == 3
    train_only = load_folder_dataset(f["train"])
    assert train_only.test == [] and not train_only.has_masks


def test_folder_dataset_errors(tmp_path):
    f = make_folders(tmp_path)
    with pytest.raises(ImageLoadError, match="nothing: not a folder"):
        load_folder_dataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="empty: folder holds no images"):
        load_folder_dataset(f["train"], tmp_path / "empty")
    with pytest.raises(ImageLoadError, match="nomasks: mask folder not found"):
        load_folder_dataset(f["train"], f["good"], f["bad"], tmp_path / "nomasks")
    with pytest.raises(ValueError, match="masks were given without test_defective"):
        load_folder_dataset(f["train"], masks=f["masks"])
    save(f["masks"] / "a_mask.png", mask_array(255))
    with pytest.raises(ImageLoadError, match=r"a\.png: more than one mask matches this image: a\.png, a_mask\.png"):
        load_folder_dataset(f["train"], f["good"], f["bad"], f["masks"])
    save(f["masks"] / "a_mask.png", np.zeros((2, 2), np.uint8))
    (f["masks"] / "a.png").unlink()
    with pytest.raises(ImageLoadError, match=r"a_mask\.png: mask is 2x2 pixels but its image .*a\.png is 16x12"):
        load_folder_dataset(f["train"], f["good"], f["bad"], f["masks"])


def test_folder_dataset_skip_bad(tmp_path):
    f = make_folders(tmp_path)
    (f["good"] / "g0.jpg").write_bytes(b"\xff\xd8junk")
    (f["masks"] / "b_mask.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipping"):
        data = load_folder_dataset(f["train"], f["good"], f["bad"], f["masks"], skip_bad=True)
    assert [p.name for p, _ in data.skipped] == ["g0.jpg", "b.png"]
    assert [s.path.name for s in data.test] == ["a.png", "c.png"]
    assert "b_mask.png: not an image file" in data.skipped[1][1]


# --- real data ----------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent")
def test_real_mvtec_bottle():
    if not MVTEC_BOTTLE.is_dir():
        pytest.skip(f"MVTec bottle not found at {MVTEC_BOTTLE}")
    assert "bottle" in mvtec_categories(MVTEC_BOTTLE.parent)
    data = load_mvtec_category(MVTEC_BOTTLE.parent, "bottle")
    assert (len(data.train), len(data.test)) == (209, 83)
    assert sum(s.mask_path is not None for s in data.test) == 63
    assert sum(s.label for s in data.test) == 63 and data.has_masks and data.skipped == []
    assert {s.defect_type for s in data.test} == {"good", "broken_large", "broken_small", "contamination"}
    defective = next(s for s in data.test if s.label)
    mask = load_mask(defective)
    assert mask.shape == (900, 900) and 0 < mask.sum() < mask.size


# --- plain folder layout (good/ + one folder per defect type) --------------------------------


def make_layout(root: Path, with_train: bool = True) -> Path:
    for i in range(5):
        save(root / "good" / f"g{i}.png", rgb())
    if with_train:
        for i in range(3):
            save(root / "train" / f"t{i}.png", rgb())
    save(root / "scratch" / "s0.png", rgb())
    save(root / "scratch" / "s1.png", rgb())
    save(root / "spot" / "p0.jpg", rgb())
    save(root / "masks" / "scratch" / "s0.png", mask_array(255))
    save(root / "masks" / "scratch" / "s1_mask.png", mask_array(255))
    save(root / "masks" / "p0.png", mask_array(1))  # flat beside the per-type folders
    return root


def test_folder_layout_finds_defect_types_masks_and_training_images(tmp_path):
    root = make_layout(tmp_path / "parts")
    data = load_folder_layout(root)
    assert data.name == "parts" and [p.name for p in data.train] == ["t0.png", "t1.png", "t2.png"]
    summary = [(s.path.name, s.label, s.defect_type, s.mask_path and s.mask_path.name) for s in data.test]
    assert summary == [("g0.png", 0, "good", None), ("g1.png", 0, "good", None), ("g2.png", 0, "good", None),
                       ("g3.png", 0, "good", None), ("g4.png", 0, "good", None),
                       ("s0.png", 1, "scratch", "s0.png"), ("s1.png", 1, "scratch", "s1_mask.png"),
                       ("p0.jpg", 1, "spot", "p0.png")]
    assert data.has_masks


def test_folder_layout_without_training_images_holds_out_a_seeded_share_of_good(tmp_path):
    root = make_layout(tmp_path / "parts", with_train=False)
    data = load_folder_layout(root, test_share=0.4, seed=1)
    held_out = [s.path.name for s in data.test if s.label == 0]
    assert len(held_out) == 2 and len(data.train) == 3
    assert sorted(held_out + [p.name for p in data.train]) == [f"g{i}.png" for i in range(5)]
    assert held_out == [s.path.name for s in load_folder_layout(root, test_share=0.4, seed=1).test if s.label == 0]
    with pytest.raises(ImageLoadError, match="holds no defect folders"):
        load_folder_layout(_only_good(tmp_path / "g"))


def _only_good(root: Path) -> Path:
    save(root / "good" / "a.png", rgb())
    return root
