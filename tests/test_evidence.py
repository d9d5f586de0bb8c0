"""Evidence for every verdict: the nearest normal patch behind an anomalous patch's score."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import FAST
from patchcore import PatchCore


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Training photos of one part, aligned (the same layout, new sensor noise each), and a photo
    of it with a darker spot: every location looks different, so the nearest normal patch of the
    spot's patch is the same place on a training photo."""
    rng = np.random.default_rng(0)
    layout = np.asarray(Image.fromarray((rng.random((12, 18, 3)) * 255).astype(np.uint8)).resize((144, 96), Image.BICUBIC),
                        dtype=np.float32)
    folder = tmp_path_factory.mktemp("aligned")
    train = []
    for i in range(6):
        path = folder / f"good_{i}.png"
        Image.fromarray(np.clip(layout + rng.normal(0, 4, layout.shape), 0, 255).astype(np.uint8)).save(path)
        train.append(path)
    defect = np.clip(layout + rng.normal(0, 4, layout.shape), 0, 255)
    defect[40:52, 80:92] *= 0.6  # rows 40-52, columns 80-92
    Image.fromarray(defect.astype(np.uint8)).save(folder / "spot.png")
    model = PatchCore(**FAST, resize=96, coreset_ratio=0.5).fit(train)
    return model, train, folder / "spot.png"


def test_the_evidence_points_to_the_same_place_on_an_aligned_training_photo(aligned):
    model, train, spot = aligned
    prediction = model.predict(spot, evidence=3)[0]
    first = prediction.evidence[0]
    # The most anomalous patch is on the spot, and its score is the distance to that training patch.
    left, top, right, bottom = first.box
    assert left <= 86 <= right and top <= 46 <= bottom
    assert first.distance == pytest.approx(float(prediction.patch_scores.max()))
    assert (first.training_row, first.training_column) == (first.row, first.column)
    assert first.training_image in {str(p) for p in train} and first.training_box == first.box
    # Three patches, apart from each other, in decreasing score.
    assert len(prediction.evidence) == 3
    assert [e.distance for e in prediction.evidence] == sorted((e.distance for e in prediction.evidence), reverse=True)
    assert all(max(abs(a.row - b.row), abs(a.column - b.column)) > 2
               for i, a in enumerate(prediction.evidence) for b in prediction.evidence[i + 1:])
    assert model.predict(spot)[0].evidence == []  # only when asked


def test_evidence_survives_save_load_and_export(aligned, tmp_path):
    from patchcore import load_model
    from patchcore.engine.export import export_model

    model, _, spot = aligned
    expected = model.predict(spot, evidence=2)[0].evidence
    model.save(tmp_path / "saved")
    export_model(model, tmp_path / "export")
    for directory in ("saved", "export"):
        again = load_model(tmp_path / directory).predict(spot, evidence=2)[0].evidence
        assert [(e.training_image, e.training_row, e.training_column) for e in again] == \
            [(e.training_image, e.training_row, e.training_column) for e in expected]


def test_predict_writes_evidence_json_and_pictures(aligned, tmp_path):
    from patchcore.cli.main import main

    model, _, spot = aligned
    model.save(tmp_path / "model")
    assert main(["predict", str(tmp_path / "model"), str(spot), "-o", str(tmp_path / "out"), "--evidence", "2"]) == 0
    found = json.loads((tmp_path / "out" / "evidence.json").read_text())[str(spot)]
    assert len(found) == 2 and found[0]["training_row"] == found[0]["row"]
    picture = Image.open(tmp_path / "out" / found[0]["picture"])
    assert picture.height == 128 and picture.width > 2 * 100  # the patch and the normal patch side by side
    pixels = np.asarray(picture).astype(int)
    half = picture.width // 2
    assert pixels[:, : half - 6].mean() < pixels[:, half + 6 :].mean()  # the darker spot is on the left


def test_the_service_answers_with_evidence(aligned, tmp_path):
    from fastapi.testclient import TestClient

    from patchcore.serving.app import create_app

    model, _, spot = aligned
    model.save(tmp_path / "model")
    with TestClient(create_app({"m": tmp_path / "model"})) as client:
        assert client.get("/v1/models").json()["models"][0]["evidence"] is True
        body = client.post("/v1/models/m/predict?evidence=2", content=spot.read_bytes(),
                           headers={"content-type": "image/png"}).json()
        assert len(body["evidence"]) == 2 and body["evidence"][0]["training_column"] == body["evidence"][0]["column"]
        picture = Image.open(io.BytesIO(base64.b64decode(body["evidence"][0]["picture_png"])))
        assert picture.height == 128
        refused = client.post("/v1/models/m/predict?evidence=99", content=spot.read_bytes(),
                              headers={"content-type": "image/png"})
        assert refused.status_code == 422 and "evidence" in refused.json()["error"]
