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


def test_the_service_takes_good_images_from_this_machine_only(line, tmp_path):
    import io

    from fastapi.testclient import TestClient

    from patchcore.serving.app import create_app

    model, variation, defect = line
    model.save(tmp_path / "m")
    app = create_app({"m": tmp_path / "m"})

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    files = [("file", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(variation[:-1])]
    with TestClient(app, client=("10.1.2.3", 5000)) as remote:
        refused = remote.post("/v1/models/m/good", files=files)
        assert refused.status_code == 403 and "this machine only" in refused.json()["error"]
    with TestClient(app, client=("127.0.0.1", 5000)) as local:
        before = local.post("/v1/models/m/predict", content=png(variation[-1]), headers={"content-type": "image/png"}).json()
        assert before["is_anomalous"] is True
        answer = local.post("/v1/models/m/good", files=files).json()
        assert answer["images"] == 4 and answer["added_to_bank"] > 0
        after = local.post("/v1/models/m/predict", content=png(variation[-1]), headers={"content-type": "image/png"}).json()
        assert after["is_anomalous"] is False and after["score"] < before["score"]
        assert local.post("/v1/models/m/predict", content=png(defect), headers={"content-type": "image/png"}).json()["is_anomalous"]
    assert load_model(tmp_path / "m").teach_in_[-1]["images"] == 4  # saved to the model directory
