"""Training on turned and mirrored copies (``augment``): what enters the bank, evidence, teach-in, old files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import product_image, small_model_settings
from PIL import Image

from patchcore import PatchCore, load_model
from patchcore.engine.augmentation import Augmenter, View, parse_augment, view_placement
from patchcore.engine.geometry import InputTransform
from patchcore.engine.settings import ADDED_IN_FORMAT_6
from patchcore.errors import ModelFormatError


def striped(rng: np.random.Generator, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A part with an orientation: horizontal stripes (8 px), a faint vertical wave, noise."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = 0.5 + 0.3 * np.sin(2 * np.pi * y / 8 + rng.uniform(0, 2 * np.pi)) + 0.05 * np.sin(2 * np.pi * x / 24)
    image = np.stack([texture, texture * 0.8 + 0.1, np.full_like(texture, 0.3)], -1) + rng.normal(0, 0.02, (height, width, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def settings(**overrides):
    """Whole 64x48 photos at their own size (a non-square input, so that quarter turns change its shape)."""
    return small_model_settings(**{"resize": 48, "crop": None, **overrides})


@pytest.fixture(scope="module")
def stripes():
    rng = np.random.default_rng(0)
    return {"train": [striped(rng) for _ in range(6)], "good": [striped(rng) for _ in range(3)],
            "turned": [np.rot90(striped(rng)) for _ in range(3)]}


def test_the_augmentations_and_their_copies():
    assert [len(parse_augment(name)) for name in ("none", "flip", "rot90", "dihedral", "rotate8", "rotate3")] == [1, 4, 4, 8, 8, 3]
    assert all(views[0] == View() for views in map(parse_augment, ("flip", "rot90", "dihedral", "rotate12")))
    assert [view.angle for view in parse_augment("rotate8")] == [45.0 * i for i in range(8)]
    for bad in ("rot45", "rotate1", "rotate500", "sideways"):
        with pytest.raises(ValueError, match="augment must be one of"):
            parse_augment(bad)
    with pytest.raises(ValueError, match="augment must be one of"):
        PatchCore(**settings(augment="rot45")).fit(np.zeros((48, 64, 3), np.uint8))


def test_copies_move_pixels_where_the_view_says_exactly_for_quarter_turns_and_mirrors():
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(3, 40, 56)).astype(np.float32)
    assert np.array_equal(View(False, 90).apply(pixels), np.rot90(pixels, 1, axes=(1, 2)))  # counter-clockwise
    assert np.array_equal(View(True, 0).apply(pixels), pixels[:, :, ::-1])
    assert np.array_equal(View(True, 180).apply(pixels), pixels[:, ::-1, :])  # flip's "mirrored up-down"
    spot = np.zeros((1, 40, 56), np.float32)
    spot[0, 9, 47] = 1.0
    for view in (View(False, 90), View(True, 270), View(False, 30.0), View(True, 200.0)):
        copy = view.apply(spot, fill=np.zeros(1))
        x, y = view.to_canvas(47.5, 9.5, 40, 56)  # the pixel's centre
        row, column = np.unravel_index(np.argmax(copy[0]), copy.shape[1:])
        assert abs(row + 0.5 - y) <= 0.5 and abs(column + 0.5 - x) <= 0.5
        assert np.allclose(view.from_canvas(x, y, 40, 56), (47.5, 9.5))


def test_a_turned_part_is_normal_only_with_augmentation(stripes):
    plain = PatchCore(**settings()).fit(stripes["train"])
    turned_plain = [p.score for p in plain.predict(stripes["turned"], maps=False)]
    assert min(turned_plain) > 2 * max(p.score for p in plain.predict(stripes["good"], maps=False))
    for augment in ("rot90", "rotate4"):
        model = PatchCore(**settings(augment=augment)).fit(stripes["train"])
        good = [p.score for p in model.predict(stripes["good"], maps=False)]
        turned = [p.score for p in model.predict(stripes["turned"], maps=False)]
        assert max(turned) <= 1.25 * max(good) and max(turned) < 0.5 * min(turned_plain)
        # Each photo and its three turns are in the training records; a photo counts once.
        assert model.n_training_images_ == 6 and len(model.training_images_) == 24
        assert sorted({r.get("view", {}).get("angle", 0.0) for r in model.training_images_}) == [0.0, 90.0, 180.0, 270.0]
        # The turned copies' patches are in the bank (64x48 -> 8x6 cells upright, 6x8 turned).
        views = np.array([model.training_images_[i].get("view", {}).get("angle", 0.0) for i in model.memory_bank_origin_[:, 0]])
        assert {90.0, 270.0} <= set(views) and model.n_training_patches_ == 4 * 6 * 48


def test_any_angle_copies_put_only_cells_wholly_inside_the_turned_photo_in_the_bank():
    rng = np.random.default_rng(2)
    photos = [product_image(rng, (48, 64)) for _ in range(2)]
    model = PatchCore(**settings(augment="rotate8", coreset_ratio=1.0)).fit(photos)  # every valid patch kept
    cell = model.transform_.cell
    counted = 0
    for record in model.training_images_:
        view = View.from_record(record.get("view"))
        height, width = view.canvas_size(48, 64)
        cells = (-(-height // cell)) * (-(-width // cell))
        valid = view.valid_cells(48, 64, cell)
        counted += cells if valid is None else int(valid.sum())
        if view.quarter_turns is None:
            assert valid.sum() < cells  # the canvas' corners lie outside the turned photo
    assert model.n_training_patches_ == counted == len(model.memory_bank_)

    # Independently of the mask: the turned photo is the polygon of its turned corners, and every
    # bank cell of a turned copy lies wholly inside it (all four corners on its inner side).
    for vector, (image, row, column) in zip(model.memory_bank_, model.memory_bank_origin_):
        view = View.from_record(model.training_images_[image].get("view"))
        if view.quarter_turns is not None:
            continue
        xs, ys = view.to_canvas(np.array([0.0, 64, 64, 0]), np.array([0.0, 0, 48, 48]), 48, 64)
        corners = [(column + dx) * cell for dx in (0, 1)], [(row + dy) * cell for dy in (0, 1)]
        for x in corners[0]:
            for y in corners[1]:
                cross = [(xs[(i + 1) % 4] - xs[i]) * (y - ys[i]) - (ys[(i + 1) % 4] - ys[i]) * (x - xs[i]) for i in range(4)]
                assert all(c >= -1e-6 for c in cross) or all(c <= 1e-6 for c in cross)

    # Each bank vector is the feature of the cell its origin names, on the copy made as the fit makes it.
    augmenter = Augmenter("rotate8", model.transform_.stride)
    features = {}
    for index, photo in enumerate(photos):
        for pixels, placement in augmenter(*model.transform_(Image.fromarray(photo))):
            features[(f"<image {index}>", getattr(placement, "view", View()))] = model.embed(pixels[None])[0]
    for vector, (image, row, column) in zip(model.memory_bank_, model.memory_bank_origin_):
        record = model.training_images_[image]
        expected = features[(record["name"], View.from_record(record.get("view")))][row, column]
        assert np.allclose(vector, expected, rtol=2e-3, atol=2e-3)  # float16 while fitting


def test_boxes_of_quarter_turned_and_mirrored_copies_map_back_exactly():
    transform = InputTransform(48, None, (0.5,) * 3, (0.25,) * 3, stride=16, cell=8)
    base = transform.placement(96, 72)  # a 96x72 photo seen at 64x48: 8x6 cells of 8 input pixels
    for view in parse_augment("dihedral")[1:]:
        turned = view_placement(base, view, transform.stride)
        rows, columns = turned.grid_size
        assert rows * columns == 48
        for row in range(6):
            for column in range(8):
                # Where the upright cell's centre lands on the copy, and the box of that copy's cell.
                x, y = view.to_canvas((column + 0.5) * 8, (row + 0.5) * 8, 48, 64)
                assert turned.patch_box(int(y // 8), int(x // 8), 8) == base.patch_box(row, column, 8)
    # Any angle: the box of a copy's cell holds the cell's centre turned back, and is not much larger.
    view = View(False, 30.0)
    turned = view_placement(base, view, transform.stride)
    valid = turned.valid_cells()
    for row, column in zip(*np.nonzero(valid)):
        left, top, right, bottom = turned.patch_box(int(row), int(column), 8, margin=0)
        u, v = view.from_canvas((column + 0.5) * 8, (row + 0.5) * 8, 48, 64)
        assert left <= u * 1.5 <= right and top <= v * 1.5 <= bottom
        assert right - left <= 1.5 * 8 * 1.4 + 2 and bottom - top <= 1.5 * 8 * 1.4 + 2


def test_evidence_from_a_turned_copy_shows_the_right_place_of_the_training_photo(tmp_path):
    rng = np.random.default_rng(3)
    photo = product_image(rng, (48, 64))
    photo[8:18, 44:54] = [20, 30, 230]  # a blue mark, top right
    path = tmp_path / "marked.png"
    Image.fromarray(photo).save(path)
    model = PatchCore(**settings(augment="rot90", coreset_ratio=1.0)).fit([path])
    turned = np.ascontiguousarray(np.rot90(photo))  # the part turned: the mark now top left
    pixels, placement = model.transform_(Image.fromarray(turned))
    grid = model.embed(pixels[None])[0][: placement.grid_size[0], : placement.grid_size[1]]
    distances, nearest = model.score_patches(grid.reshape(-1, grid.shape[-1]))
    # Ask for the evidence of the mark's cell on the turned photo (rows 10-20, columns 8-18).
    scores = np.zeros(placement.grid_size)
    scores[13 // 8, 13 // 8] = 1.0
    evidence = model.evidence_for(scores, nearest, placement, 1)[0]
    assert evidence.distance == 1.0 and evidence.training_image == str(path)
    record = model.training_images_[model.memory_bank_origin_[nearest[(13 // 8) * placement.grid_size[1] + 13 // 8], 0]]
    assert record.get("view") == {"flip": False, "angle": 90.0}  # matched on the copy turned like the test photo
    left, top, right, bottom = evidence.training_box
    crop = photo[top:bottom, left:right]
    assert (left, top, right, bottom) == (40, 0, 64, 24)  # the mark's cell (5, 1) upright, with its neighbours
    assert np.count_nonzero((crop[..., 2] > 200) & (crop[..., 0] < 60)) >= 50  # the blue mark is in it


def test_teach_in_applies_the_models_augmentation_saved_and_exported(stripes, tmp_path):
    from patchcore.engine.export import export_model

    rng = np.random.default_rng(4)
    model = PatchCore(**settings(augment="rot90")).fit(stripes["train"])
    # A new kind of good part: a checker pattern, then seen turned.
    y, x = np.mgrid[0:48, 0:64]
    checker = ((((y // 6) + (x // 10)) % 2) * 150 + 50).astype(np.uint8)
    new = [np.stack([checker, checker, 255 - checker], -1) + rng.integers(0, 8, (48, 64, 3)).astype(np.uint8) for _ in range(2)]
    turned_new = np.ascontiguousarray(np.rot90(new[1]))
    before = model.predict(turned_new, maps=False)[0].score
    export_model(model, tmp_path / "export")
    exported = load_model(tmp_path / "export")
    model.partial_fit(new[:1])
    after = model.predict(turned_new, maps=False)[0].score
    assert after < 0.5 * before  # the turned copies of the taught photo are in the bank
    plain = PatchCore(**settings()).fit(stripes["train"]).partial_fit(new[:1])
    assert plain.predict(turned_new, maps=False)[0].score > 2 * after  # without augmentation they are not
    assert model.teach_in_[-1]["images"] == 1 and len(model.teach_in_[-1]["sources"]) == 1
    assert model.n_training_images_ == 7 and len(model.training_images_) == 28
    assert sorted(r.get("view", {}).get("angle", 0.0) for r in model.training_images_[24:]) == [0.0, 90.0, 180.0, 270.0]
    exported.partial_fit(new[:1])  # an export (no torch) applies the same augmentation
    np.testing.assert_array_equal(exported.memory_bank_, model.memory_bank_)


def test_format_3_files_load_with_the_settings_added_since_at_what_reproduces_them(tmp_path, fitted_model, product_images):
    fitted_model.save(tmp_path / "model")
    path = tmp_path / "model" / "patchcore.json"
    manifest = json.loads(path.read_text())
    assert manifest["settings"]["augment"] == "none"
    old = {**manifest, "format_version": 3, "settings": {k: v for k, v in manifest["settings"].items()
                                                         if k not in ("augment", "aggregation", "network_precision", *ADDED_IN_FORMAT_6)}}
    path.write_text(json.dumps(old))
    loaded = PatchCore.load(tmp_path / "model")
    assert (loaded.augment, loaded.aggregation) == ("none", "max")
    expected = [p.score for p in fitted_model.predict(product_images["defective"], maps=False)]
    assert [p.score for p in loaded.predict(product_images["defective"], maps=False)] == expected
    # Strict as before: a format 3 file naming a setting of format 4 is refused, as a format 4 file lacking one.
    path.write_text(json.dumps({**old, "settings": {**old["settings"], "augment": "rot90"}}))
    with pytest.raises(ModelFormatError, match="unknown augment in a format 3 file"):
        PatchCore.load(tmp_path / "model")
    path.write_text(json.dumps({**old, "format_version": 4}))
    with pytest.raises(ModelFormatError, match="missing aggregation, augment"):
        PatchCore.load(tmp_path / "model")
