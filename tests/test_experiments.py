"""The paper's experiments (``patchcore experiment ...``), the baselines and approximate search, on tiny data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import product_image, small_model_settings
from patchcore import PatchCore
from patchcore.evaluation import experiments
from patchcore.engine.approximate_search import ApproximateIndex
from patchcore.evaluation.baselines import Padim, Spade
from patchcore.cli.main import main
from patchcore.engine.coreset import coverage_radius, greedy_coreset
from patchcore.evaluation.datasets import load_mvtec_category
from patchcore.evaluation.evaluate import evaluate_dataset
from patchcore.evaluation.experiments import runner, specs, store, tables
from patchcore.engine.search import MemoryBankIndex

FAST = ["--resize", "64", "--crop", "64", "--batch-size", "4", "--eval-size", "32", "--backbone", "efficientnet_lite0",
        "--search-backend", "numpy"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """An MVTec-style tree: 10 good training images, 3 good + 3 defective test images with masks (64x64)."""
    root = tmp_path_factory.mktemp("tiny_mvtec")
    folder = root / "widget"
    rng = np.random.default_rng(7)
    for sub in ("train/good", "test/good", "test/blotch", "ground_truth/blotch"):
        (folder / sub).mkdir(parents=True)
    for i in range(10):
        Image.fromarray(product_image(rng)).save(folder / "train/good" / f"{i:03d}.png")
    for i in range(3):
        Image.fromarray(product_image(rng)).save(folder / "test/good" / f"{i:03d}.png")
        row, col, side = 10 + 12 * i, 20, 14
        Image.fromarray(product_image(rng, defect=(row, col, side))).save(folder / "test/blotch" / f"{i:03d}.png")
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[row : row + side, col : col + side] = 255
        Image.fromarray(mask).save(folder / "ground_truth/blotch" / f"{i:03d}_mask.png")
    return root


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def _csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _outputs_ok(out: Path, name: str, rows: int, table_rows: int | None = None) -> list[dict]:
    assert (out / "results.md").read_text().count("\n|") >= (rows if table_rows is None else table_rows) + 1
    assert (out / f"{name}.png").stat().st_size > 1000
    table = _csv(out / "results.csv")
    assert len(table) == rows
    return table


def test_coreset_experiment_and_resume(tiny_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "coreset"
    argv = ["experiment", "coreset", str(tiny_root), "-o", str(out), "--ratios", "0.01,0.1", *FAST]
    printed = _run(argv, capsys)
    assert "image AUROC" in printed and "greedy" in printed and "random" in printed
    table = _outputs_ok(out, "coreset", 4)
    assert {(r["ratio"], r["subsampling"]) for r in table} == {(r, s) for r in ("0.01", "0.1") for s in ("greedy", "random")}
    by = {(r["ratio"], r["subsampling"]): r for r in table}
    for ratio in ("0.01", "0.1"):
        assert by[(ratio, "greedy")]["memory_bank_size"] == by[(ratio, "random")]["memory_bank_size"]
        # k-center greedy minimises the coverage radius; random sampling of the same size cannot do much better.
        assert float(by[(ratio, "greedy")]["coverage_radius"]) <= float(by[(ratio, "random")]["coverage_radius"]) * 1.05
    assert int(by[("0.1", "greedy")]["memory_bank_size"]) > int(by[("0.01", "greedy")]["memory_bank_size"])
    assert float(by[("0.1", "greedy")]["image_auroc"]) >= 0.9

    # Second run: every cell is read back, none is computed.
    calls = []
    original = runner.evaluate_dataset
    monkeypatch.setattr(runner, "evaluate_dataset", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = _run(argv, capsys)
    assert calls == []
    assert again.splitlines()[:6] == printed.splitlines()[:6]
    assert len((out / "cells.jsonl").read_text().splitlines()) == 4
    # A new ratio computes only the new cells.
    _run(["experiment", "coreset", str(tiny_root), "-o", str(out), "--ratios", "0.01,0.1,0.25", *FAST], capsys)
    assert len(calls) == 2
    assert len(_csv(out / "results.csv")) == 6
    # Other model settings: the stored cells do not count.
    _run(["experiment", "coreset", str(tiny_root), "-o", str(out), "--ratios", "0.01", "--neighbourhood", "1", *FAST], capsys)
    assert len(calls) == 4


def test_greedy_coverage_beats_random_on_features(fitted_model):
    """On real patch features, the greedy coreset covers them better than a random subset of the same size."""
    features = fitted_model.memory_bank_
    kept = greedy_coreset(features, 0.05, seed=0)
    rng = np.random.default_rng(0)
    random_kept = rng.choice(len(features), size=len(kept), replace=False)
    assert coverage_radius(features, kept) < coverage_radius(features, random_kept)


def test_shots_experiment_more_shots_help(tiny_root, tmp_path, capsys):
    out = tmp_path / "shots"
    _run(["experiment", "shots", str(tiny_root), "-o", str(out), "--shots", "1,2,8", "--seeds", "2",
          "--coreset-ratio", "0.1", *FAST], capsys)
    table = _outputs_ok(out, "shots", 6, table_rows=3)
    assert sorted({(r["shots"], r["seed"]) for r in table}) == sorted({(s, d) for s in ("1", "2", "8") for d in ("0", "1")})
    assert {r["n_train"] for r in table if r["shots"] == "8"} == {"8"}
    summary = {s["shots"]: s for s in tables.shots_summary(store.read_cells(out / "cells.jsonl").values())}
    assert summary[8]["seeds"] == 2
    assert summary[8]["image_auroc_mean"] >= summary[1]["image_auroc_mean"] - 0.1
    assert summary[8]["image_auroc_mean"] >= 0.9
    assert "±" in (out / "results.md").read_text()


def test_layers_backbones_and_speed(tiny_root, tmp_path, capsys):
    out = tmp_path / "layers"
    _run(["experiment", "layers", str(tiny_root), "-o", str(out), "--layer-sets", "blocks.2,blocks.2+blocks.4",
          "--neighbourhoods", "1,3", *FAST], capsys)
    table = _outputs_ok(out, "layers", 3)
    assert [(r["layers"], r["p"]) for r in table] == [("blocks.2", "3"), ("blocks.2+blocks.4", "3"), ("blocks.2+blocks.4", "1")]
    assert int(table[0]["feature_dim"]) < int(table[1]["feature_dim"])

    out = tmp_path / "backbones"
    _run(["experiment", "backbones", str(tiny_root), "-o", str(out), "--backbones", "efficientnet_lite0", *FAST], capsys)
    assert _outputs_ok(out, "backbones", 1)[0]["backbone"] == "efficientnet_lite0"

    out = tmp_path / "speed"
    _run(["experiment", "speed", str(tiny_root), "-o", str(out), "--ratios", "0.25", "--indexes", "exact,hnsw,ivfpq", *FAST], capsys)
    table = _outputs_ok(out, "speed", 3)
    for row in table:
        assert float(row["ms_backbone"]) > 0 and float(row["ms_search"]) > 0 and float(row["ms_map"]) > 0
        assert float(row["image_auroc"]) >= 0.8
    assert "IVF-PQ" in table[2]["index_description"]


def test_default_layer_sets():
    sets = specs.default_layer_sets("efficientnet_lite0")
    assert ["blocks.2"] in sets and ["blocks.2", "blocks.4"] in sets and ["blocks.1", "blocks.2", "blocks.4"] in sets


def test_missing_weights_are_skipped(tiny_root, tmp_path, capsys, monkeypatch):
    from patchcore.errors import WeightsUnavailableError

    def unavailable(cell):
        raise WeightsUnavailableError(f"no weights for {cell['backbone']}")

    spec = experiments.build_spec("backbones", experiments.ExperimentOptions(backbones=["nope"]),
                                  {"backbone": "efficientnet_lite0"})
    spec.make_model = unavailable
    dataset = load_mvtec_category(tiny_root, "widget")
    rows, computed = experiments.run_cells(spec, dataset, tmp_path, 32, progress=False)
    assert computed == 1 and "weights unavailable" in rows[0]["skipped"]
    assert "weights unavailable" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("cls", [Spade, Padim])
def test_baselines_beat_chance(tiny_root, cls):
    dataset = load_mvtec_category(tiny_root, "widget")
    model = cls(**{k: v for k, v in small_model_settings().items()
                   if k not in ("coreset_ratio", "search_backend", "max_bank_size")})
    result = evaluate_dataset(model, dataset, None, eval_size=32)
    assert result["image_auroc"] >= 0.85 and result["pixel_auroc"] >= 0.85
    prediction = model.predict([dataset.test[0].path])[0]
    assert prediction.anomaly_map.shape == (64, 64) and prediction.patch_scores.ndim == 2


def test_evaluate_method_option_and_fit_refuses_baselines(tiny_root, tmp_path, capsys):
    _run(["evaluate", str(tiny_root), "-o", str(tmp_path / "ev"), "--method", "padim", *FAST], capsys)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics[0]["image_auroc"] >= 0.85
    # Baselines cannot be saved: fit does not offer them.
    with pytest.raises(SystemExit):
        main(["fit", str(tiny_root / "widget/train/good"), "-o", str(tmp_path / "m"), "--method", "spade"])
    assert "unrecognized arguments: --method" in capsys.readouterr().err


def test_random_sampler_and_approximate_search_round_trip(tiny_root, tmp_path):
    """The paper's random-subsampling baseline and an approximate index are plain PatchCore settings."""
    train = load_mvtec_category(tiny_root, "widget").train
    model = PatchCore(**small_model_settings(sampler="random", search_backend="hnsw")).fit(train)
    assert model.memory_bank_.shape[0] == int(np.ceil(0.25 * model.n_training_patches_))
    greedy = PatchCore(**small_model_settings()).fit(train)
    assert not np.array_equal(model.coreset_indices_, greedy.coreset_indices_)
    model.save(tmp_path / "m")
    loaded = PatchCore.load(tmp_path / "m")
    assert loaded.get_params() == {**model.get_params(), "progress": False}
    assert loaded.index_.kind == "hnsw"
    image = load_mvtec_category(tiny_root, "widget").test[0].path
    assert loaded.predict([image])[0].score == pytest.approx(model.predict([image])[0].score, rel=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_index_close_to_exact(kind):
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = bank[:200] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    exact_d, exact_i = MemoryBankIndex(bank).search(queries, 1)
    index = ApproximateIndex(bank, kind)
    assert index.size == 3000 and index.memory_bank.shape == bank.shape
    d, i = index.search(queries, 3)
    assert d.shape == i.shape == (200, 3)
    assert np.mean(i[:, 0] == exact_i[:, 0]) >= 0.8
    assert np.median(np.abs(d[:, 0] - exact_d[:, 0])) < 0.5 * np.median(exact_d)
