import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import small_model_settings
from patchcore import ImageLoadError, ModelFormatError, NotFittedError, PatchCore


def test_constructor_only_stores_settings():
    model = PatchCore(backbone="no_such_backbone", coreset_ratio=5.0)  # validated in fit, not here
    assert model.get_params()["coreset_ratio"] == 5.0
    assert not hasattr(model, "memory_bank_")
    with pytest.raises(ValueError, match="coreset ratio"):
        model.fit(np.zeros((64, 64, 3), np.uint8))


def test_use_before_fit_is_a_clear_error():
    with pytest.raises(NotFittedError, match="not fitted yet"):
        PatchCore().predict(np.zeros((64, 64, 3), np.uint8))


def test_fit_returns_self_and_learns_a_bank(product_images, fitted_model):
    model = fitted_model
    assert isinstance(model, PatchCore)
    assert model.n_training_images_ == 12 and model.n_training_patches_ == 12 * 64
    assert model.memory_bank_.shape == (int(np.ceil(12 * 64 * 0.25)), 152)  # 40 + 112 channels of lite0


def test_defects_score_higher_and_are_localised(product_images, fitted_model):
    good = fitted_model.predict(product_images["good"])
    bad = fitted_model.predict(product_images["defective"])
    assert min(p.score for p in bad) > max(p.score for p in good)
    for i, prediction in enumerate(bad):
        assert prediction.anomaly_map.shape == (64, 64)
        row, col = np.unravel_index(np.argmax(prediction.anomaly_map), (64, 64))
        # The blotch covers rows 20+4i .. 34+4i, cols 24 .. 38.
        assert 20 + 4 * i - 6 <= row <= 34 + 4 * i + 6 and 24 - 6 <= col <= 38 + 6
        assert set(prediction.timings) == {"backbone", "search", "map"}


def test_accepts_paths_folders_pil_images_and_arrays(product_images, fitted_model):
    path = product_images["good"][0]
    by_path = fitted_model.predict(path, maps=False)[0].score
    by_folder = fitted_model.predict(path.parent, maps=False)[0].score
    by_pil = fitted_model.predict(Image.open(path), maps=False)[0].score
    by_array = fitted_model.predict(np.asarray(Image.open(path)), maps=False)[0].score
    # Batches of different sizes may round differently in the convolutions: equal to 1e-5.
    assert by_pil == by_array == by_path
    assert by_folder == pytest.approx(by_path, rel=1e-5)


def test_plain_maximum_without_reweighting(product_images, fitted_model):
    prediction = fitted_model.predict(product_images["defective"][0])[0]
    fitted_model.reweight = False
    try:
        assert fitted_model.predict(product_images["defective"][0])[0].score == pytest.approx(float(prediction.patch_scores.max()))
    finally:
        fitted_model.reweight = True



def test_image_score_is_the_papers_eq_7_computed_by_brute_force(product_images, fitted_model):
    from patchcore.engine.images import read_image

    image = read_image(product_images["defective"][1])
    pixels, _ = fitted_model.transform_(image)
    patches = fitted_model.embed(pixels[None])[0].reshape(-1, fitted_model.memory_bank_.shape[1]).astype(np.float64)
    bank = fitted_model.memory_bank_.astype(np.float64)
    distances = np.linalg.norm(patches[:, None, :] - bank[None, :, :], axis=2)  # every patch to every bank vector
    worst = int(np.argmax(distances.min(axis=1)))
    s_star = distances[worst].min()
    m_star = int(np.argmin(distances[worst]))
    neighbourhood = np.argsort(np.linalg.norm(bank - bank[m_star], axis=1))[:9]  # N_b(m*), m* itself included
    to_patch = np.linalg.norm(bank[neighbourhood] - patches[worst], axis=1)
    weight = 1.0 - np.exp(s_star) / np.exp(to_patch).sum()
    prediction = fitted_model.predict(product_images["defective"][1])[0]
    assert prediction.patch_scores.max() == pytest.approx(s_star, rel=1e-4)
    assert prediction.score == pytest.approx(weight * s_star, rel=1e-4)


def test_anomaly_map_at_original_size_through_the_crop(product_images):
    model = PatchCore(**small_model_settings(resize=72, crop=64)).fit(product_images["train"][:6])
    big = np.asarray(Image.open(product_images["defective"][0]).resize((160, 96)))
    prediction = model.predict(big)[0]
    assert prediction.anomaly_map.shape == (96, 160)


def test_save_load_gives_bit_identical_scores(tmp_path, product_images, fitted_model):
    fitted_model.save(tmp_path / "model")
    loaded = PatchCore.load(tmp_path / "model")
    images = product_images["good"] + product_images["defective"]
    before = fitted_model.predict(images)
    after = loaded.predict(images)
    assert [p.score for p in before] == [p.score for p in after]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(before, after))
    assert loaded.get_params() == {**fitted_model.get_params(), "progress": False}
    files = sorted(os.listdir(tmp_path / "model"))
    assert [f for f in files if not f.endswith((".safetensors", ".onnx"))] == [".lock", "history.jsonl", "patchcore.json",
                                                                             "versions"]
    # The network's graph beside the backbone's weights: loading needs no torch.
    assert [f.split("-")[0] for f in files if f.endswith((".safetensors", ".onnx"))] == ["backbone", "memory_bank",
                                                                                         "network"]
    assert os.listdir(tmp_path / "model" / "versions") == ["000001.json"]


def test_saving_again_makes_a_new_version_and_removes_only_files_no_kept_version_needs(tmp_path, product_images,
                                                                                       fitted_model):
    fitted_model.save(tmp_path / "model")
    other = PatchCore(**small_model_settings(coreset_ratio=0.1)).fit(product_images["train"][:4])
    other.save(tmp_path / "model")
    assert PatchCore.load(tmp_path / "model").memory_bank_.shape == other.memory_bank_.shape
    # Two memory banks (version 1 stays restorable) and one backbone file and graph (the same network: one name).
    assert len(list((tmp_path / "model").glob("memory_bank-*.safetensors"))) == 2
    assert len(list((tmp_path / "model").glob("backbone-*.safetensors"))) == 1
    assert len(list((tmp_path / "model").glob("network-*.onnx"))) == 1
    other.save(tmp_path / "model", keep_versions=1)  # keep only the current version: the others' files go
    assert len(list((tmp_path / "model").glob("*.safetensors"))) == 2
    assert os.listdir(tmp_path / "model" / "versions") == ["000003.json"]


def test_a_crash_while_saving_keeps_the_previous_model(tmp_path, product_images, fitted_model, monkeypatch):
    fitted_model.save(tmp_path / "model")
    other = PatchCore(**small_model_settings(coreset_ratio=0.1)).fit(product_images["train"][:4])
    real_replace = os.replace

    def crash_on_manifest(source, target):
        if str(target).endswith("patchcore.json"):
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        other.save(tmp_path / "model")
    monkeypatch.setattr(os, "replace", real_replace)
    restored = PatchCore.load(tmp_path / "model")
    assert np.array_equal(restored.memory_bank_, fitted_model.memory_bank_)


def test_altered_or_unknown_model_files_are_refused(tmp_path, fitted_model):
    fitted_model.save(tmp_path / "model")
    bank = next((tmp_path / "model").glob("memory_bank-*.safetensors"))
    data = bytearray(bank.read_bytes())
    data[-1] ^= 0xFF
    bank.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="checksum does not match"):
        PatchCore.load(tmp_path / "model")

    fitted_model.save(tmp_path / "model2")
    manifest_path = tmp_path / "model2" / "patchcore.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="format version 99 is not supported"):
        PatchCore.load(tmp_path / "model2")
    with pytest.raises(ModelFormatError, match="not found"):
        PatchCore.load(tmp_path / "absent")
    # Nothing in a model directory is a pickle: tensors are safetensors, the rest JSON.
    for path in (tmp_path / "model2").rglob("*"):
        assert path.is_dir() or not path.read_bytes().startswith(b"\x80")


def test_bad_training_image_names_the_file_or_is_skipped(tmp_path, product_images):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    images = product_images["train"][:3] + [bad]
    with pytest.raises(ImageLoadError, match="bad.png"):
        PatchCore(**small_model_settings()).fit(images)
    skipped = []
    model = PatchCore(**small_model_settings()).fit(images, on_error=skipped.append)
    assert model.n_training_images_ == 3 and len(skipped) == 1


def test_faiss_backend_gives_the_same_scores(product_images, fitted_model):
    numpy_scores = [p.score for p in fitted_model.predict(product_images["defective"], maps=False)]
    fitted_model.search_backend = "faiss"
    fitted_model._set_memory_bank(fitted_model.memory_bank_)
    try:
        faiss_scores = [p.score for p in fitted_model.predict(product_images["defective"], maps=False)]
    finally:
        fitted_model.search_backend = "numpy"
        fitted_model._set_memory_bank(fitted_model.memory_bank_)
    assert np.allclose(numpy_scores, faiss_scores, rtol=1e-4)


def test_threshold_from_good_images_is_saved_and_drives_decisions(tmp_path, product_images):
    model = PatchCore(**small_model_settings(calibration="none")).fit(product_images["train"])
    assert model.predict(product_images["good"][0])[0].is_anomalous is None  # no threshold yet
    model.calibrate_threshold(product_images["good"], max_false_positive_rate=0.0)
    good = model.predict(product_images["good"])
    assert max(p.score for p in good) < model.threshold_  # no held-out good image is flagged
    assert not any(p.is_anomalous for p in good)
    bad = model.predict(product_images["defective"])
    assert all(p.is_anomalous for p in bad)
    assert all(p.mask.shape == (64, 64) and p.mask.dtype == bool for p in bad)
    assert bad[0].mask[27, 31] and not bad[0].mask[2, 2]
    model.save(tmp_path / "model")
    loaded = PatchCore.load(tmp_path / "model")
    assert loaded.threshold_ == model.threshold_ and "good images" in loaded.threshold_source_
    with pytest.raises(ValueError, match="finite"):
        model.set_threshold(float("nan"))


@pytest.mark.parametrize("backend", ["hnsw", "ivfpq"])
def test_approximate_search_backends_stay_close_to_exact(product_images, backend, tmp_path):
    exact = PatchCore(**small_model_settings()).fit(product_images["train"])
    approximate = PatchCore(**small_model_settings(search_backend=backend)).fit(product_images["train"])
    images = product_images["good"] + product_images["defective"]
    exact_predictions = exact.predict(images, maps=False)
    approximate_predictions = approximate.predict(images, maps=False)
    # An approximate neighbour is never nearer than the true one: patch scores only rise (up to the
    # rounding of the exact search's |q|^2 - 2 q.b + |b|^2 form, about 1e-6 of |q|^2 in squared distance).
    for e, a in zip(exact_predictions, approximate_predictions):
        slack = 1e-5 * float(e.patch_scores.max()) ** 2
        assert np.all(a.patch_scores**2 >= e.patch_scores**2 - slack)
    # Image scores (eq. 7 also depends on the neighbours found) stay close, and the ranking holds.
    exact_scores = np.array([p.score for p in exact_predictions])
    approximate_scores = np.array([p.score for p in approximate_predictions])
    # On a bank this small the approximate index mostly finds the exact neighbours: most scores agree
    # up to rounding; where eq. 7's neighbourhood of m* differs, a score moves by a few percent.
    relative = np.abs(approximate_scores - exact_scores) / exact_scores
    assert np.sum(relative < 1e-4) >= len(relative) - 2 and relative.max() < 0.05
    assert min(approximate_scores[4:]) > max(approximate_scores[:4])
    approximate.save(tmp_path / "m")
    assert PatchCore.load(tmp_path / "m").search_backend == backend


def test_auto_search_is_exact_for_small_banks_and_hnsw_with_measured_recall_above(product_images, monkeypatch):
    from patchcore.engine import detector
    from patchcore.engine.approximate_search import ApproximateIndex
    from patchcore.engine.search import MemoryBankIndex

    small = PatchCore(**small_model_settings(search_backend="auto")).fit(product_images["train"])
    assert isinstance(small.index_, MemoryBankIndex) and small.search_recall_ == 1.0
    monkeypatch.setattr(detector, "AUTO_EXACT_LIMIT", 10)
    large = PatchCore(**small_model_settings(search_backend="auto")).fit(product_images["train"])
    assert isinstance(large.index_, ApproximateIndex) and large.index_.kind == "hnsw"
    assert 0.9 <= large.search_recall_ <= 1.0


def test_the_largest_patch_score_is_exact_even_with_a_poor_approximate_index(product_images, fitted_model):
    import copy

    from patchcore.engine.approximate_search import ApproximateIndex
    from patchcore.engine.images import read_image
    from patchcore.engine.search import MemoryBankIndex

    model = copy.copy(fitted_model)
    model.index_ = ApproximateIndex(model.memory_bank_, "hnsw", hnsw_neighbours=2, ef_search=1)  # misses often
    model.exact_index_ = None
    exact = MemoryBankIndex(model.memory_bank_)
    missed = 0
    for path in product_images["defective"] + product_images["good"]:
        pixels, _ = model.transform_(read_image(path))
        patches = model.embed(pixels[None])[0].reshape(-1, model.memory_bank_.shape[1])
        approximate, _ = model.index_.search(patches, 1)
        scores, nearest = model.score_patches(patches)
        true_scores, true_nearest = exact.search(patches, 1)
        missed += int(np.sum(approximate[:, 0] > true_scores[:, 0] + 1e-3))
        top = int(np.argmax(true_scores[:, 0]))
        assert scores.max() == pytest.approx(true_scores.max(), rel=1e-5) and nearest[top] == true_nearest[top, 0]
        assert np.all(scores >= true_scores[:, 0] - 1e-3)  # the rest may stay a little high, never low
    assert missed > 0  # the index really was approximate: the re-checks did the work
