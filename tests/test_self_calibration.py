"""Self-calibration (issue 21): a default fit sets thresholds from its own training photos, each
scored against the bank without its own vectors; the record survives save, load and export;
held-out photos still win."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import beta

from conftest import bank_only_detector, small_model_settings
from patchcore import PatchCore, load_model
from patchcore.cli.main import main
from patchcore.engine.export import export_model
from patchcore.engine.self_calibration import false_positive_interval, photo_groups
from patchcore.engine.thresholds import flagging_threshold
from patchcore.errors import ModelFormatError


@pytest.fixture(scope="module")
def self_calibrated(product_images):
    return PatchCore(**small_model_settings()).fit(product_images["train"])


def _left_out_by_hand(model, photo_grid: np.ndarray, left_out_images: list[int]) -> float:
    """The image score of a photo against the bank with every vector of ``left_out_images``
    removed, by a detector built over that smaller bank: what leaving the photo out must give."""
    keep = ~np.isin(model.memory_bank_origin_[:, 0], left_out_images)
    assert 0 < keep.sum() < len(keep)  # the photo did give the bank vectors, and others remain
    settings = model.settings()
    detector = bank_only_detector(model.memory_bank_[keep], num_neighbours=settings.num_neighbours,
                                  aggregation=settings.aggregation, reweight=settings.reweight)
    patches = photo_grid.reshape(-1, photo_grid.shape[-1])
    distances, nearest = detector.score_patches(patches)
    return detector.image_score(distances, nearest, patches)


def test_a_default_fit_sets_thresholds_from_its_own_photos(self_calibrated, product_images):
    model = self_calibrated
    record = model.calibration_
    assert model.settings().calibration == "self"
    assert record["method"] == "self" and record["photos"] == 12  # fewer than the 50 sampled: every photo
    assert record["names"] == [str(path) for path in product_images["train"]]
    # The threshold is the rule applied to the recorded distribution: 12 scores at 1% allow no false
    # alarm, so it sits just above the highest left-out score.
    assert model.threshold_ == flagging_threshold(record["scores"], 0.01)
    assert model.threshold_ > max(record["scores"]) >= np.float32(model.threshold_) - 1e-3
    assert model.threshold_kind() == "self-calibrated from 12 training photos"
    assert model.threshold_estimate().startswith("expected false-positive rate 7.7% (95% interval 0.21-26.5%")
    # Verdicts out of the box: every defective test photo flagged, no good one.
    assert [p.is_anomalous for p in model.predict(product_images["defective"], maps=False)] == [True] * 4
    assert [p.is_anomalous for p in model.predict(product_images["good"], maps=False)] == [False] * 4


def test_each_photo_is_scored_without_its_own_bank_vectors(self_calibrated, product_images):
    model = self_calibrated
    for photo in (0, 5, 11):
        grid = model.extract_patches([product_images["train"][photo]]).image_grid(0)
        expected = _left_out_by_hand(model, grid, [photo])
        assert model.calibration_["scores"][photo] == pytest.approx(expected, rel=1e-5)
        # With its own vectors in the bank the photo scores lower: they were really left out.
        patches = grid.reshape(-1, grid.shape[-1])
        distances, nearest = model.score_patches(patches)
        assert model.image_score(distances, nearest, patches) < 0.9 * expected


def test_an_approximate_index_gives_the_exact_left_out_image_score(product_images):
    model = PatchCore(**small_model_settings(search_backend="hnsw", calibration_photos=4)).fit(product_images["train"])
    assert type(model.index_).__name__ == "ApproximateIndex"
    names = [str(path) for path in product_images["train"]]
    for name, score in zip(model.calibration_["names"], model.calibration_["scores"]):
        photo = names.index(name)
        grid = model.extract_patches([name]).image_grid(0)
        assert score == pytest.approx(_left_out_by_hand(model, grid, [photo]), rel=1e-5)


def test_every_copy_of_an_augmented_photo_is_left_out(product_images):
    model = PatchCore(**small_model_settings(augment="flip", calibration_photos=3)).fit(product_images["train"][:6])
    groups = photo_groups(model.training_images_)
    assert len(groups) == 6 and all(len(group) == 4 for group in groups)  # the photo and its 3 mirrored copies
    names = [str(path) for path in product_images["train"][:6]]
    for name, score in zip(model.calibration_["names"], model.calibration_["scores"]):
        group = groups[names.index(name)]
        assert {model.training_images_[i]["name"] for i in group} == {name}
        grid = model.extract_patches([name]).image_grid(0)  # the photo itself (the first of its copies)
        assert score == pytest.approx(_left_out_by_hand(model, grid, group), rel=1e-5)
        # Leaving out the photo but not its copies would let its patches find the copies' vectors.
        patches = grid.reshape(-1, grid.shape[-1])
        copies = model.memory_bank_[np.isin(model.memory_bank_origin_[:, 0], group[1:])]
        others = model.memory_bank_[~np.isin(model.memory_bank_origin_[:, 0], group)]
        nearest_copy = np.linalg.norm(patches[:, None] - copies[None], axis=2).min(axis=1)
        nearest_other = np.linalg.norm(patches[:, None] - others[None], axis=2).min(axis=1)
        assert (nearest_copy < nearest_other).mean() > 0.2


def test_the_record_survives_save_load_and_export(self_calibrated, product_images, tmp_path):
    self_calibrated.save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "patchcore.json").read_text())
    assert manifest["settings"]["calibration"] == "self" and manifest["state"]["calibration"]["method"] == "self"
    export_model(self_calibrated, tmp_path / "export")
    images = product_images["good"] + product_images["defective"]
    expected = [p.is_anomalous for p in self_calibrated.predict(images, maps=False)]
    for loaded in (load_model(tmp_path / "model"), load_model(tmp_path / "export")):
        assert loaded.calibration_ == self_calibrated.calibration_
        assert (loaded.threshold_, loaded.pixel_threshold_) == (self_calibrated.threshold_, self_calibrated.pixel_threshold_)
        assert loaded.threshold_kind() == "self-calibrated from 12 training photos"
        assert [p.is_anomalous for p in loaded.predict(images, maps=False)] == expected


def test_held_out_photos_win_and_no_threshold_sets_none(tmp_path, product_images, capsys):
    train = str(product_images["train"][0].parent)
    options = ["--coreset-ratio", "0.25", "--resize", "64", "--crop", "64", "--backbone", "efficientnet_lite0"]
    assert main(["fit", train, "-o", str(tmp_path / "self"), *options]) == 0
    out = capsys.readouterr().out
    assert ("self-calibrated from 12 training photos, false-positive rate <= 0.01 (image) and 0.001 (pixel); "
            "expected false-positive rate 7.7% (95% interval 0.21-26.5%") in out
    good = [str(path) for path in product_images["good"]]
    assert main(["fit", train, "-o", str(tmp_path / "held"), "--calibrate", *good, *options]) == 0
    assert "calibrated on 4 held-out good photos, false-positive rate <= 0.01 (image)" in capsys.readouterr().out
    held = load_model(tmp_path / "held")
    assert held.calibration_["method"] == "held-out" and held.calibration_["names"] == good
    assert held.settings().calibration == "none"  # the fit did not spend time on thresholds it would replace
    assert held.threshold_ == flagging_threshold(held.calibration_["scores"], 0.01)
    assert held.threshold_ != load_model(tmp_path / "self").threshold_
    assert main(["fit", train, "-o", str(tmp_path / "none"), "--no-threshold", *options]) == 0
    assert "no threshold (--no-threshold)" in capsys.readouterr().out
    assert load_model(tmp_path / "none").threshold_ is None
    assert main(["predict", str(tmp_path / "self"), *good, "-o", str(tmp_path / "out"), "--no-overlays"]) == 0
    out = capsys.readouterr().out
    assert "(self-calibrated from 12 training photos)" in out and out.count("  ok  ") == 4


def test_teach_in_keeps_the_threshold_and_recalibrate_self_estimates_it_again(tmp_path, product_images, capsys):
    train = [str(path) for path in product_images["train"][:8]]
    options = ["--coreset-ratio", "0.25", "--resize", "64", "--crop", "64", "--backbone", "efficientnet_lite0"]
    assert main(["fit", *train, "-o", str(tmp_path / "model"), *options]) == 0
    before = load_model(tmp_path / "model")
    assert main(["add", str(tmp_path / "model"), *map(str, product_images["train"][8:10])]) == 0
    assert "thresholds kept (self-calibrated from 8 training photos)" in capsys.readouterr().out
    kept = load_model(tmp_path / "model")
    assert (kept.threshold_, kept.calibration_) == (before.threshold_, before.calibration_)
    assert main(["add", str(tmp_path / "model"), *map(str, product_images["train"][10:]), "--recalibrate", "self"]) == 0
    assert "self-calibrated from 12 training photos" in capsys.readouterr().out
    again = load_model(tmp_path / "model")
    assert again.calibration_["names"] == [str(path) for path in product_images["train"]]
    assert again.threshold_ == flagging_threshold(again.calibration_["scores"], 0.01)
    # The same as a fit on the same photos would set it, photo by photo, when the bank is the same:
    # each photo's left-out score is measured against the taught bank without that photo's vectors.
    # (Recalibration reads the photo's features in float32, the fit's store keeps float16: 1e-3.)
    grid = again.extract_patches([train[0]]).image_grid(0)
    assert again.calibration_["scores"][0] == pytest.approx(_left_out_by_hand(again, grid, [0]), rel=1e-3)


def test_recalibrating_needs_the_photos_where_they_were(self_calibrated, tmp_path, product_images):
    import copy

    model = copy.copy(self_calibrated)
    model.training_images_ = [{**record, "name": str(tmp_path / f"gone-{i}.png")}
                              for i, record in enumerate(model.training_images_)]
    with pytest.raises(ValueError, match="not there"):
        model.self_calibrate_threshold()
    bare = PatchCore(**small_model_settings())
    patches = bare.extract_patches(product_images["train"])
    bare.fit_patches(patches.read(0, len(patches)))
    assert bare.threshold_ is None  # a bare feature matrix has no photos to leave out
    with pytest.raises(ValueError, match="self-calibration needs it"):
        bare.self_calibrate_threshold()


@pytest.mark.parametrize("count, rate", [(12, 0.01), (50, 0.01), (100, 0.01), (209, 0.05), (1000, 0.001)])
def test_the_false_positive_interval_is_the_order_statistics_beta(count, rate):
    expected, low, high = false_positive_interval(count, rate)
    allowed = min(int(np.floor(rate * count + 1e-9)), count - 1)
    assert expected == pytest.approx((allowed + 1) / (count + 1))
    assert (low, high) == pytest.approx(beta.ppf([0.025, 0.975], allowed + 1, count - allowed), rel=1e-6)
    # And it is what thresholds set that way give: simulated good scores, new good photos.
    rng = np.random.default_rng(count)
    rates = [np.mean(rng.normal(size=4000) >= flagging_threshold(rng.normal(size=count), rate)) for _ in range(300)]
    assert np.mean(rates) == pytest.approx(expected, abs=0.25 * expected + 0.002)
    assert low - 0.002 <= np.median(rates) <= high


def test_settings_are_checked():
    for bad, message in (({"calibration": "held-out"}, "calibration must be one of self, none"),
                         ({"calibration_photos": 1}, "calibration_photos must be at least 2"),
                         ({"max_fpr": 1.5}, r"max_fpr must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            PatchCore(**bad)._validate_settings()


def test_drift_expects_the_share_a_self_calibrated_threshold_aims_at(self_calibrated):
    from patchcore.station.drift import expected_flagged_share

    expected = expected_flagged_share(self_calibrated.threshold_source_)
    # 12 photos cannot promise less than 1/13, which is above the 1% asked for.
    assert expected.share == pytest.approx(1 / 13) and "on 12 good images" in expected.basis


def test_a_format_5_model_loads_without_a_calibration_record(tmp_path, product_images):
    model = PatchCore(**small_model_settings(calibration="none")).fit(product_images["train"])
    model.calibrate_threshold(product_images["good"])
    model.save(tmp_path / "model")
    path = tmp_path / "model" / "patchcore.json"
    manifest = json.loads(path.read_text())
    for name in ("calibration", "calibration_photos", "max_fpr", "max_pixel_fpr"):
        manifest["settings"].pop(name)
    manifest["state"].pop("calibration")
    path.write_text(json.dumps({**manifest, "format_version": 5}))  # as patchcore wrote it before issue 21
    loaded = PatchCore.load(tmp_path / "model")
    assert loaded.settings().calibration == "none" and loaded.calibration_ is None
    assert loaded.threshold_ == model.threshold_ and loaded.threshold_estimate() is None
    assert loaded.threshold_kind() == "calibrated on 4 held-out good photos"  # read from its threshold source
    with pytest.raises(ModelFormatError, match="missing calibration"):
        path.write_text(json.dumps({**manifest, "format_version": 6}))  # a format 6 file must record them
        PatchCore.load(tmp_path / "model")
