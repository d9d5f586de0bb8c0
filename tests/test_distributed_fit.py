"""One model fitted on a local Ray (2 CPUs, started by the tests): the same bank and scores as the
local chunked fit, a worker that dies mid-fit, bad photos, URIs and the command line."""

import os
import shutil

import numpy as np
import pytest

from conftest import small_model_settings
from patchcore import PatchCore
from patchcore.engine.coreset import Chunking
from patchcore.errors import ImageLoadError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'patchcore[ray]')")

#: Every test photo is 64x64 -> 64 patches; 4 photos a chunk, so 12 training photos make 3 chunks.
CHUNKING = Chunking(exact_limit=0, chunk_size=256)


def _crash_hook(trigger: str):
    """A Ray worker-process setup hook: the first attempt at chunk 1 after ``trigger`` appears kills
    its worker process (as a machine lost mid-fit would); the trigger is used up by that attempt."""

    def install() -> None:
        from patchcore.fleet import distributed_fit

        reduce = distributed_fit.reduce_photos

        def dying(model, chunk, *args, **kwargs):
            if chunk == 1:
                try:
                    os.unlink(trigger)
                except FileNotFoundError:
                    pass
                else:
                    os._exit(1)
            return reduce(model, chunk, *args, **kwargs)

        distributed_fit.reduce_photos = dying

    return install


@pytest.fixture(scope="module")
def crash_trigger(tmp_path_factory):
    return tmp_path_factory.mktemp("crash") / "kill-chunk-1"


@pytest.fixture(scope="module")
def local_ray(crash_trigger):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _crash_hook(str(crash_trigger))})
    yield ray
    ray.shutdown()


def _settings(**changes):
    return {**small_model_settings(), "threads": 1, **changes}


def _local_chunked_fit(paths, on_error=None, **changes) -> PatchCore:
    model = PatchCore(**_settings(**changes))
    with model.extract_patches(paths, on_error=on_error) as patches:  # what fit does, with CHUNKING
        return model.fit_patches(patches, chunking=CHUNKING).calibrate_from_patches(patches)


def _ray_fit(paths, **kwargs) -> PatchCore:
    from patchcore.fleet.distributed_fit import fit_on_ray

    settings = kwargs.pop("settings", {})
    return fit_on_ray(PatchCore(**_settings(**settings)), paths, workers=2, chunking=CHUNKING, progress=False, **kwargs)


def _assert_same_model(ray_model: PatchCore, local: PatchCore, test_images) -> None:
    np.testing.assert_array_equal(ray_model.memory_bank_, local.memory_bank_)
    np.testing.assert_array_equal(ray_model.memory_bank_origin_, local.memory_bank_origin_)
    np.testing.assert_array_equal(ray_model.coreset_indices_, local.coreset_indices_)
    assert ray_model.training_images_ == local.training_images_
    assert ray_model.n_training_patches_ == local.n_training_patches_
    assert ray_model.normal_patch_score_mean_ == local.normal_patch_score_mean_
    # Self-calibrated alike: the driver makes the sampled photos' patches again, to float16 as stored.
    assert ray_model.calibration_["method"] == local.calibration_["method"] == "self"
    assert ray_model.threshold_ == pytest.approx(local.threshold_, rel=1e-5)
    assert ray_model.pixel_threshold_ == pytest.approx(local.pixel_threshold_, rel=1e-5)
    ours, theirs = ray_model.predict(test_images), local.predict(test_images)
    np.testing.assert_array_equal([p.score for p in ours], [p.score for p in theirs])
    for mine, other in zip(ours, theirs):
        np.testing.assert_array_equal(mine.anomaly_map, other.anomaly_map)


def test_a_fit_on_ray_chooses_the_bank_of_the_local_chunked_fit(local_ray, product_images):
    train = [str(p.resolve()) for p in product_images["train"]]
    local = _local_chunked_fit(train)
    fitted = _ray_fit(product_images["train"])  # listed, and made absolute, by the driver
    # Three chunks of four photos, each keeping its share of the bank twice over; the merge picks the bank.
    assert fitted.n_training_patches_ == 12 * 64 and len(fitted.memory_bank_) == int(np.ceil(0.25 * 12 * 64))
    assert fitted.fit_timings_["features"] > 0 and fitted.fit_timings_["merge"] > 0
    assert sum(w["chunks"] for w in fitted.ray_workers_.values()) == 3
    assert sum(w["photos"] for w in fitted.ray_workers_.values()) == 12
    _assert_same_model(fitted, local, product_images["good"] + product_images["defective"])
    # The chunked bank is a different (composed) selection from the whole-set greedy one.
    whole = PatchCore(**_settings()).fit(train)
    assert not np.array_equal(whole.memory_bank_, fitted.memory_bank_)


def test_copies_of_augmented_photos_are_chunked_with_their_photo(local_ray, product_images):
    train = [str(p.resolve()) for p in product_images["train"]]
    local = _local_chunked_fit(train, augment="flip")
    fitted = _ray_fit(train, settings={"augment": "flip"})
    assert len(fitted.training_images_) == 4 * 12 and fitted.n_training_images_ == 12
    _assert_same_model(fitted, local, product_images["defective"])


def test_a_worker_that_dies_mid_fit_has_its_chunk_redone(local_ray, crash_trigger, product_images):
    train = [str(p.resolve()) for p in product_images["train"]]
    crash_trigger.write_text("kill the worker that reduces chunk 1")
    fitted = _ray_fit(train)
    assert not crash_trigger.exists()  # the first attempt at chunk 1 ran, and its worker died
    _assert_same_model(fitted, _local_chunked_fit(train), product_images["defective"])


def test_a_bad_photo_is_named_or_skipped_as_in_the_local_fit(local_ray, tmp_path, product_images):
    folder = tmp_path / "train"
    folder.mkdir()
    for path in product_images["train"]:
        shutil.copy(path, folder / path.name)
    broken = folder / "train_05b.png"  # sorts into the second chunk
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageLoadError) as raised:
        _ray_fit([folder])
    assert raised.value.source == str(broken) and "not an image" in raised.value.problem
    skipped, skipped_locally = [], []
    fitted = _ray_fit([folder], on_error=skipped.append)
    assert [(e.source, e.problem) for e in skipped] == [(str(broken), raised.value.problem)]
    local = _local_chunked_fit(sorted(str(p) for p in folder.iterdir()), on_error=skipped_locally.append)
    assert [e.source for e in skipped_locally] == [str(broken)]
    assert fitted.n_training_images_ == 12 and str(broken) not in {r["name"] for r in fitted.training_images_}
    _assert_same_model(fitted, local, product_images["defective"])


def test_photos_named_by_uri_are_read_through_pyarrow(local_ray, product_images):
    folder = product_images["train"][0].parent.resolve()
    fitted = _ray_fit([folder.as_uri()])
    assert [r["name"] for r in fitted.training_images_] == [p.resolve().as_uri() for p in product_images["train"]]
    local = _local_chunked_fit([str(p.resolve()) for p in product_images["train"]])
    np.testing.assert_array_equal(fitted.memory_bank_, local.memory_bank_)
    with pytest.raises(ValueError, match="not found"):
        _ray_fit([folder.as_uri() + "-missing"])


def test_the_command_line_fits_on_ray_and_saves_a_model(local_ray, tmp_path, product_images, capsys):
    from patchcore.cli.main import main

    train = product_images["train"][0].parent
    settings = small_model_settings()
    options = ["--backbone", settings["backbone"], "--resize", str(settings["resize"]), "--crop", str(settings["crop"]),
               "--coreset-ratio", str(settings["coreset_ratio"]), "--max-bank-size", "none", "--threads", "1"]
    assert main(["fit", str(train), "-o", str(tmp_path / "model"), "--ray", "--workers", "2", *options]) == 0
    printed = capsys.readouterr().out
    assert "chunk 1 of 1 reduced" in printed and "fitted on 12 images" in printed
    assert "self-calibrated from 12 training photos" in printed
    saved = PatchCore.load(tmp_path / "model")
    # 12 photos of 64 patches fit in one chunk of the default size: the bank of a fit that chunks its
    # patches by whole photos, and keeps greedy's picks of that one chunk, then greedy over them.
    model = PatchCore(**_settings())
    with model.extract_patches(sorted(str(p.resolve()) for p in train.iterdir())) as patches:
        local = model.fit_patches(patches, chunking=Chunking(exact_limit=0))
    np.testing.assert_array_equal(saved.memory_bank_, local.memory_bank_)
    assert saved.threshold_kind() == "self-calibrated from 12 training photos"
    with pytest.raises(SystemExit):
        main(["fit", str(train), "-o", str(tmp_path / "other"), "--ray", "--workers", "0"])


def test_turned_copies_of_oblong_photos_point_back_to_their_image(local_ray, tmp_path, product_images):
    """Quarter turns of 64x48 photos are batched by shape, so the local store holds them out of
    photo order: each bank vector must still name the image (photo and copy) and cell it came from."""
    from PIL import Image

    paths = []
    for path in product_images["train"][:8]:
        paths.append(str(tmp_path / path.name))
        Image.open(path).crop((0, 0, 64, 48)).save(paths[-1])
    settings = {"augment": "rot90", "coreset_ratio": 0.5, "crop": None}
    local = _local_chunked_fit(paths, **settings)
    with PatchCore(**_settings(**settings)).extract_patches(paths) as store:
        assert [key[1] for key in store.image_keys[:4]] != [0, 1, 2, 3]  # copies stored out of photo order
        for vector, (image, row, column) in zip(local.memory_bank_, local.memory_bank_origin_):
            rows = np.arange(*store.image_rows(image))
            cells = store.origins(rows)
            (at,) = rows[(cells[:, 1] == row) & (cells[:, 2] == column)]
            np.testing.assert_array_equal(vector, store.read(at, at + 1)[0])
    fitted = _ray_fit(paths, settings=settings)
    np.testing.assert_array_equal(fitted.memory_bank_, local.memory_bank_)
    named = [fitted.training_images_[i] for i in fitted.memory_bank_origin_[:, 0]]
    assert named == [local.training_images_[i] for i in local.memory_bank_origin_[:, 0]]
    np.testing.assert_array_equal(fitted.memory_bank_origin_[:, 1:], local.memory_bank_origin_[:, 1:])
