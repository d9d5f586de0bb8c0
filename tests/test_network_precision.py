"""The setting network_precision (issue 17, item 4): an int8 network fitted, saved, loaded and taught as one."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from sklearn.base import clone

from conftest import small_model_settings
from patchcore import PatchCore, load_model
from patchcore.cli.main import build_parser
from patchcore.cli.options import model_settings_from_args
from patchcore.engine import persistence
from patchcore.engine.export import export_model
from patchcore.engine.onnx_network import OnnxNetwork
from patchcore.engine.settings import ADDED_IN_FORMAT_6, ModelSettings, read_settings

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def int8_model(product_images):
    return PatchCore(**small_model_settings(network_precision="int8")).fit(product_images["train"])


@pytest.fixture(scope="module")
def test_images(product_images) -> list:
    return product_images["good"] + product_images["defective"]


def _scores(model, images) -> list[float]:
    return [p.score for p in model.predict(images, maps=False)]


def _features(graph: bytes, model, images) -> np.ndarray:
    """Patch features of ``images`` as ``graph`` computes them, all cells as rows (not through the model)."""
    from patchcore.engine.images import read_image

    pixels = np.stack([model.transform_(read_image(path))[0] for path in images])
    features = OnnxNetwork(graph)(pixels)
    return features.reshape(-1, features.shape[-1]).astype(np.float16).astype(np.float32)  # as the patch store keeps them


def _nearest(rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    return np.sqrt(((rows[:, None, :] - candidates[None, :, :]) ** 2).sum(-1).min(axis=1))


def test_the_setting_round_trips_and_is_checked():
    settings = ModelSettings(network_precision="int8")
    assert ModelSettings.from_json(json.loads(json.dumps(settings.to_json())), "x") == settings
    model = PatchCore(network_precision="int8")
    assert model.settings().network_precision == "int8" and clone(model).network_precision == "int8"
    assert "network_precision='int8'" in repr(model)
    for bad, message in (({"network_precision": "int4"}, "network_precision must be one of float32, int8"),
                         ({"network_precision": "int8", "runtime": "torch"}, "ONNX Runtime on the CPU"),
                         ({"network_precision": "int8", "device": "cuda"}, "ONNX Runtime on the CPU")):
        with pytest.raises(ValueError, match=message):
            PatchCore(**bad)._validate_settings()
    args = build_parser().parse_args(["fit", "train", "-o", "m", "--network-precision", "int8"])
    assert model_settings_from_args(args)["network_precision"] == "int8"
    assert "network_precision" not in model_settings_from_args(build_parser().parse_args(["fit", "train", "-o", "m"]))


def test_older_formats_read_as_float32_and_stay_strict():
    recorded = {k: v for k, v in ModelSettings().to_json().items() if k != "network_precision" and k not in ADDED_IN_FORMAT_6}
    assert read_settings(recorded, "f", 4)[0].network_precision == "float32"
    assert read_settings({k: v for k, v in recorded.items() if k not in ("augment", "aggregation")}, "f",
                         3)[0].network_precision == "float32"
    with pytest.raises(ValueError, match="unknown network_precision in a format 4 file"):
        read_settings({**recorded, "network_precision": "int8"}, "f", 4)
    with pytest.raises(ValueError, match="missing network_precision"):
        read_settings({**recorded, **ADDED_IN_FORMAT_6}, "f", 6)


def test_a_format_4_model_file_loads_as_float32_and_scores_identically(tmp_path, fitted_model, test_images):
    fitted_model.save(tmp_path / "model")
    path = tmp_path / "model" / "patchcore.json"
    manifest = json.loads(path.read_text())
    assert manifest["format_version"] == persistence.FORMAT_VERSION == 6
    assert manifest["settings"].pop("network_precision") == "float32"
    for name in ADDED_IN_FORMAT_6:
        manifest["settings"].pop(name)
    path.write_text(json.dumps({**manifest, "format_version": 4}))
    loaded = PatchCore.load(tmp_path / "model")
    assert loaded.network_precision == "float32"
    assert _scores(loaded, test_images) == _scores(fitted_model, test_images)


def test_an_int8_model_is_saved_with_its_int8_graph_and_reloads_to_the_same_scores(int8_model, tmp_path, test_images):
    from patchcore.engine.quantization import graph_operators

    assert int8_model.device_ == "onnxruntime" and "quantize" in int8_model.fit_timings_
    int8_model.save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "patchcore.json").read_text())
    assert manifest["settings"]["network_precision"] == "int8"
    assert manifest["state"]["network"]["cache_key"] is None  # the cache holds float graphs only
    graphs = list((tmp_path / "model").glob("network-*.onnx"))
    assert len(graphs) == 1 and graph_operators(graphs[0].read_bytes()).get("QLinearConv", 0) > 0
    assert hashlib.sha256(graphs[0].read_bytes()).hexdigest() == int8_model.network_.graph_sha256
    loaded = PatchCore.load(tmp_path / "model")
    assert loaded.network_precision == "int8"
    assert _scores(loaded, test_images) == _scores(int8_model, test_images)
    export_model(int8_model, tmp_path / "export")  # the export runs the same int8 graph
    assert _scores(load_model(tmp_path / "export"), test_images) == _scores(int8_model, test_images)
    with pytest.raises(ValueError, match="ONNX only"):
        export_model(int8_model, tmp_path / "openvino", format="openvino")


def test_int8_scores_follow_the_float_scores(int8_model, fitted_model, product_images, test_images):
    """Measured: Pearson 0.9998 on these 8 images; every defective image still above every good one."""
    expected, got = _scores(fitted_model, test_images), _scores(int8_model, test_images)
    assert np.corrcoef(expected, got)[0, 1] >= 0.99
    assert min(got[len(product_images["good"]):]) > max(got[:len(product_images["good"])])
    assert got != expected  # a different network


def test_the_bank_and_what_is_taught_come_from_the_int8_network(int8_model, fitted_model, product_images):
    """Every bank vector is a patch of a training photo as the int8 graph computes it (not as the
    float graph does), and so is what teach-in adds."""
    int8_graph, float_graph = int8_model.network_.graph_bytes(), fitted_model.network_.graph_bytes()
    train = product_images["train"]
    assert _nearest(int8_model.memory_bank_, _features(int8_graph, int8_model, train)).max() < 1e-3
    assert _nearest(int8_model.memory_bank_, _features(float_graph, int8_model, train)).max() > 1e-2
    model = PatchCore(**small_model_settings(network_precision="int8")).fit(train[:6])
    graph, before = model.network_.graph_bytes(), len(model.memory_bank_)
    model.partial_fit(train[6:])
    added = model.memory_bank_[before:]
    assert model.network_.graph_bytes() == graph  # taught with the network it was fitted with
    assert len(added) and _nearest(added, _features(graph, model, train[6:])).max() < 1e-3


def test_the_baselines_refuse_int8():
    from patchcore.evaluation.baselines import create_detector

    with pytest.raises(ValueError, match="for patchcore only"):
        create_detector("spade", backbone="efficientnet_lite0", network_precision="int8")


def test_a_photo_that_cannot_be_read_is_skipped_by_the_calibration_too(product_images, tmp_path):
    """It is the first photo, so one the calibration picks; the fit reports it once, as a float fit does."""
    bad = tmp_path / "0-bad.png"
    bad.write_bytes(b"not an image")
    skipped = []
    model = PatchCore(**small_model_settings(network_precision="int8")).fit([bad, *product_images["train"][:5]],
                                                                         on_error=skipped.append)
    assert [error.source for error in skipped] == [str(bad)] and model.n_training_images_ == 5
    with pytest.raises(ValueError, match="not an image"):
        PatchCore(**small_model_settings(network_precision="int8")).fit([bad, *product_images["train"][:5]])


def test_an_ensemble_passes_the_setting_to_each_member(product_images, int8_model, test_images):
    from patchcore import PatchCoreEnsemble

    settings = {k: v for k, v in small_model_settings(network_precision="int8").items() if k != "backbone"}
    ensemble = PatchCoreEnsemble(["efficientnet_lite0"], settings).fit(product_images["train"])
    member = ensemble.members_[0]
    assert member.network_.graph_bytes() == int8_model.network_.graph_bytes()
    np.testing.assert_array_equal(member.memory_bank_, int8_model.memory_bank_)
