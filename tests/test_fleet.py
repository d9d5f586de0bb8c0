"""Fleet scale on a local Ray (2 CPUs, started by the tests): scoring and fitting many models."""

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import product_image, small_model_settings
from patchcore import PatchCore
from patchcore.engine.persistence import model_sha256

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'patchcore[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


COLUMNS = ["path", "score", "is_anomalous", "error", "model_sha256"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, product_images):
    folder = tmp_path_factory.mktemp("ray") / "model"
    PatchCore(**small_model_settings(), threads=1).fit(product_images["train"]).save(folder)
    return folder


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _header(path):
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


def test_ray_scores_equal_the_single_process_ones_and_a_rerun_resumes(local_ray, tmp_path, saved_model, product_images):
    from patchcore.cli.main import main
    from patchcore.fleet.scoring import predict_on_ray

    images = [p.resolve() for p in product_images["good"] + product_images["defective"]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    first = predict_on_ray(saved_model, images[:5], tmp_path / "out", workers=2, batch_size=2, progress=False)
    assert first == {**first, "images": 5, "already_scored": 0, "scored": 5, "failed": 0}
    summary = predict_on_ray(saved_model, [*images, broken], tmp_path / "out", workers=2, batch_size=2,
                             progress=False)
    assert summary["already_scored"] == 5 and summary["scored"] == 3 and summary["failed"] == 1  # only the new ones
    rows = {row["path"]: row for row in _rows(tmp_path / "out" / "scores.csv")}
    assert len(rows) == 9 and "not an image" in rows[str(broken.resolve())]["error"]
    expected = PatchCore.load(saved_model).predict(images, maps=False)
    for path, prediction in zip(images, expected):
        assert float(rows[str(path)]["score"]) == pytest.approx(prediction.score, rel=1e-6, abs=1e-6)
    again = predict_on_ray(saved_model, images, tmp_path / "out", progress=False)
    assert again["scored"] == 0 and again["already_scored"] == 8
    # The plain path writes the same file: columns, verdicts, errors and the model's SHA-256.
    assert main(["predict", str(saved_model), *map(str, images), str(broken.resolve()), "-o",
                 str(tmp_path / "plain"), "--no-overlays"]) == 1
    assert _header(tmp_path / "plain" / "scores.csv") == _header(tmp_path / "out" / "scores.csv") == COLUMNS
    plain = {row["path"]: row for row in _rows(tmp_path / "plain" / "scores.csv")}
    assert plain.keys() == rows.keys()
    for path, row in rows.items():
        assert {**plain[path], "score": ""} == {**row, "score": ""}
        assert row["model_sha256"] == model_sha256(saved_model)
        if row["score"]:
            assert float(plain[path]["score"]) == pytest.approx(float(row["score"]), rel=1e-5, abs=1e-5)


def test_ray_resume_scores_fixed_images_and_the_one_on_a_cut_off_last_line(local_ray, tmp_path, saved_model,
                                                                           product_images):
    from patchcore.fleet.scoring import predict_on_ray

    (tmp_path / "photos").mkdir()
    first, cut = (shutil.copy(p, tmp_path / "photos") for p in product_images["good"][:2])
    fixed = tmp_path / "photos" / "fixed.png"
    fixed.write_bytes(b"not a png yet")
    results = tmp_path / "out" / "scores.csv"
    before = predict_on_ray(saved_model, [tmp_path / "photos"], tmp_path / "out", workers=1, progress=False)
    assert (before["scored"], before["failed"]) == (2, 1)
    shutil.copy(product_images["defective"][0], fixed)  # the image is repaired
    rows = _rows(results)
    cut_row = next(row for row in rows if row["path"] == str(Path(cut).resolve()))
    with open(results, "w", newline="") as handle:  # as if the run was killed while writing cut's row
        csv.writer(handle, lineterminator="\n").writerows([COLUMNS, *([row[c] for c in COLUMNS] for row in rows
                                                                     if row is not cut_row)])
        handle.write(",".join(cut_row[c] for c in COLUMNS)[:-10])
    after = predict_on_ray(saved_model, [tmp_path / "photos"], tmp_path / "out", workers=1, progress=False)
    assert (after["already_scored"], after["scored"], after["failed"]) == (1, 2, 0)
    rows = _rows(results)
    assert sorted(row["path"] for row in rows) == sorted(str(Path(p).resolve()) for p in (first, cut, fixed))
    assert all(row["score"] and not row["error"] and row["model_sha256"] == model_sha256(saved_model) for row in rows)
    again = {row["path"]: row for row in rows}[cut_row["path"]]
    assert float(again["score"]) == pytest.approx(float(cut_row["score"]), abs=1e-5)


def test_fit_many_isolates_a_failing_folder(local_ray, tmp_path):
    from patchcore.cli.main import main

    rng = np.random.default_rng(1)
    for line in ("line_a", "line_b", "broken_line"):
        (tmp_path / "root" / line).mkdir(parents=True)
    for line in ("line_a", "line_b"):
        for i in range(6):
            Image.fromarray(product_image(rng)).save(tmp_path / "root" / line / f"{i}.png")
    (tmp_path / "root" / "broken_line" / "0.png").write_bytes(b"garbage")
    code = main(["fit-many", str(tmp_path / "root"), "-o", str(tmp_path / "models"), "--ray",
                 "--resize", "64", "--coreset-ratio", "0.25"])
    assert code == 1  # one folder failed ...
    assert sorted(os.listdir(tmp_path / "models")) == ["line_a", "line_b"]  # ... the others were fitted
    for line in ("line_a", "line_b"):
        assert PatchCore.load(tmp_path / "models" / line).n_training_images_ == 6


def test_fit_many_without_ray_runs_one_by_one(tmp_path):
    from patchcore.fleet.fit_many import fit_many

    rng = np.random.default_rng(2)
    (tmp_path / "root" / "only").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(product_image(rng)).save(tmp_path / "root" / "only" / f"{i}.png")
    results = fit_many(tmp_path / "root", tmp_path / "models", small_model_settings(), progress=False)
    assert [r["ok"] for r in results] == [True] and (tmp_path / "models" / "only" / "patchcore.json").is_file()
