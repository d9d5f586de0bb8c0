"""Teach-in: good images added to a fitted model without refitting."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, product_image
from patchcore import PatchCore, load_model
from patchcore.engine.coreset import continue_greedy


def test_continuing_greedy_adds_the_farthest_new_points_and_nothing_already_covered():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((200, 8)).astype(np.float32)
    far = np.full((1, 8), 9.0, np.float32)
    candidates = np.concatenate([bank[:50], far, bank[:5] + 0.01]).astype(np.float32)
    picks = continue_greedy(bank, candidates, 3)
    assert picks[0] == 50  # the one far away first
    assert 50 not in picks[1:] and all(p >= 51 for p in picks[1:])  # then the nearly-covered, never the exact copies
    assert len(continue_greedy(bank, bank[:20], 5)) == 0  # copies of bank vectors add nothing


def _tinted(rng, count, tint=(1.25, 1.0, 0.8)):
    """Good products from a new batch of material: the same weave, another colour."""
    return [np.clip(product_image(rng, (64, 96)) * np.array(tint), 0, 255).astype(np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    rng = np.random.default_rng(4)
    train = [product_image(rng, (64, 96)) for _ in range(10)]
    calibration = [product_image(rng, (64, 96)) for _ in range(8)]
    variation = _tinted(rng, 5)
    defect = product_image(rng, (64, 96), defect=(20, 40, 12))
    model = PatchCore(**FAST, resize=64, coreset_ratio=0.25).fit(train)
    # A threshold with room above the good images (as a line would set it after a week of runs).
    model.set_threshold(1.15 * max(p.score for p in model.predict(calibration, maps=False)), source="test")
    return model, variation, defect


def test_an_image_flagged_before_teach_in_passes_after_and_a_defect_still_does_not(line, tmp_path):
    model, variation, defect = line
    flagged = variation[-1]
    assert model.predict(flagged, maps=False)[0].is_anomalous  # a false alarm on the new material
    threshold, bank = model.threshold_, model.memory_bank_.shape[0]
    model.save(tmp_path / "before")
    taught = PatchCore.load(tmp_path / "before").partial_fit(variation[:-1])
    assert taught.threshold_ == threshold  # kept
    assert taught.predict(flagged, maps=False)[0].is_anomalous is False
    assert taught.predict(defect, maps=False)[0].is_anomalous is True
    record = taught.teach_in_[-1]
    assert record["images"] == 4 and record["added_to_bank"] == taught.memory_bank_.shape[0] - bank > 0
    assert len(taught.training_images_) == 10 + 4  # the evidence can point to the new images too
    taught.save(tmp_path / "after")
    again = PatchCore.load(tmp_path / "after")
    assert again.teach_in_ == taught.teach_in_ and again.memory_bank_.shape == taught.memory_bank_.shape
    assert again.predict(flagged, maps=False)[0].score == taught.predict(flagged, maps=False)[0].score


def test_the_add_command_teaches_saved_and_exported_models(line, tmp_path):
    from patchcore.cli.main import main
    from patchcore.engine.export import export_model

    model, variation, defect = line
    folder = tmp_path / "new_batch"
    folder.mkdir()
    for i, image in enumerate(variation[:-1]):
        Image.fromarray(image).save(folder / f"{i}.png")
    model.save(tmp_path / "saved")
    export_model(model, tmp_path / "export")
    for directory in ("saved", "export"):
        assert main(["add", str(tmp_path / directory), str(folder)]) == 0
        manifest = json.loads((tmp_path / directory / "patchcore.json").read_text())
        assert manifest["state"]["teach_in"][-1]["images"] == 4
        taught = load_model(tmp_path / directory)
        assert taught.predict(variation[-1], maps=False)[0].is_anomalous is False
        assert taught.predict(defect, maps=False)[0].is_anomalous is True


def test_teach_in_on_an_export_adds_exactly_what_it_adds_on_the_saved_model(line, tmp_path):
    from patchcore.engine.export import export_model

    model, variation, _ = line
    model.save(tmp_path / "saved")
    export_model(model, tmp_path / "export")
    saved, exported = load_model(tmp_path / "saved"), load_model(tmp_path / "export")
    assert exported.settings() == saved.settings()  # every setting, the coreset's included
    saved.partial_fit(variation[:2])
    exported.partial_fit(variation[:2])
    assert saved.teach_in_[-1]["added_to_bank"] == exported.teach_in_[-1]["added_to_bank"] > 0
    assert saved.memory_bank_.shape == exported.memory_bank_.shape
    np.testing.assert_allclose(exported.memory_bank_, saved.memory_bank_, atol=1e-3)  # ONNX vs torch features


def test_teach_in_honours_max_bank_size(line):
    import copy

    from patchcore.engine.detector import BankFullError

    model, variation, _ = line
    room = 3
    capped = copy.copy(model).set_params(max_bank_size=model.memory_bank_.shape[0] + room)
    capped.partial_fit(variation[:2])
    assert capped.memory_bank_.shape[0] == model.memory_bank_.shape[0] + room
    assert capped.teach_in_[-1]["capped"] is True and capped.teach_in_[-1]["added_to_bank"] == room
    # The ones kept are the farthest: greedy order, the same as an uncapped teach-in's first picks.
    free = copy.copy(model).partial_fit(variation[:2])
    np.testing.assert_array_equal(capped.memory_bank_, free.memory_bank_[: capped.memory_bank_.shape[0]])
    with pytest.raises(BankFullError, match=r"memory bank is full .*max_bank_size"):
        capped.partial_fit(variation[2:3])


def test_an_old_export_without_its_coreset_ratio_is_not_taught_with_a_guessed_one(line, tmp_path):
    from patchcore.engine.export import export_model

    model, variation, _ = line
    export_model(model, tmp_path / "export")
    manifest_path = tmp_path / "export" / "patchcore.json"
    manifest = json.loads(manifest_path.read_text())
    # What patchcore 0.2 wrote: only the settings scoring needs, format version 2.
    scoring_only = ("backbone", "layers", "num_neighbours", "reweight", "resize", "crop", "tile_size", "tile_overlap",
                    "smoothing_sigma", "search_backend", "batch_size", "seed", "threads")
    manifest["settings"] = {key: manifest["settings"][key] for key in scoring_only}
    manifest["settings"]["search_backend"] = "torch"  # the old name of numpy's exact search
    manifest["format_version"] = 2
    manifest_path.write_text(json.dumps(manifest))
    old = load_model(tmp_path / "export")
    assert old.settings().search_backend == "numpy"
    assert set(old.unrecorded_settings_) >= {"coreset_ratio", "projection_dim", "max_bank_size"}
    with pytest.raises(ValueError, match="does not record its coreset ratio"):
        old.partial_fit(variation[:1])
    old.partial_fit(variation[:1], coreset_ratio=0.25)  # given explicitly, it is used
    assert old.teach_in_[-1]["added_to_bank"] > 0


def test_settings_in_a_model_file_must_be_complete_and_known(line, tmp_path):
    model, _, _ = line
    model.save(tmp_path / "m")
    manifest_path = tmp_path / "m" / "patchcore.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["settings"]["coreset_rato"] = manifest["settings"].pop("coreset_ratio")
    manifest_path.write_text(json.dumps(manifest))
    from patchcore.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="missing coreset_ratio; unknown coreset_rato"):
        load_model(tmp_path / "m")
