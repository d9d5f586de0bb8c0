"""Tuning from good photos alone: the best measured candidate within the limits is chosen, those
over the limits are not, the budget stops trying more, and the record is saved with the model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.cli.main import main
from patchcore.engine.model import PatchCore
from patchcore.engine.persistence import history
from patchcore.evaluation.tuning import (Limits, Trial, candidate_list, check_limits, choose, describe, fit_chosen,
                                         format_trials, save_tuned, tune, tuning_record)

from test_synthetic_defects import part_photo

CANDIDATES = [
    {"backbone": "efficientnet_lite0", "resize": 96, "coreset_ratio": 0.1},
    {"backbone": "efficientnet_lite0", "resize": 64, "coreset_ratio": 0.1},
    {"backbone": "efficientnet_lite0", "resize": 64, "coreset_ratio": 0.1, "not_a_setting_yet": 1},
]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    for i in range(14):
        Image.fromarray(part_photo(rng, 128)[0]).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def tuned(good_folder):
    return tune(good_folder, CANDIDATES, limits=Limits(max_predict_ms=None), holdout_share=0.4, seed=0, progress=False)


def test_the_best_measured_candidate_is_chosen(tuned):
    measured = [t for t in tuned.trials if t.status == "measured"]
    assert len(measured) == 2
    assert [t.settings["resize"] for t in measured] == [64, 96]  # cheapest first
    assert tuned.chosen is max(measured, key=lambda t: (t.score, -t.predict_ms))
    for trial in measured:
        assert 0 <= trial.image_auroc <= 1 and 0 <= trial.aupro <= 1 and trial.predict_ms > 0 and trial.fit_seconds > 0
        assert trial.score == pytest.approx((trial.image_auroc + trial.aupro) / 2)
    skipped = [t for t in tuned.trials if t.status == "skipped"]
    assert len(skipped) == 1 and "not_a_setting_yet" in skipped[0].note
    assert tuned.record["held_out"]["good"] == 6 and tuned.record["held_out"]["defective"] == 3 * 6
    assert "part separated" in tuned.record["held_out"]["part_masks"]


def test_a_candidate_over_the_limits_is_not_chosen(tuned):
    best = tuned.chosen
    other = next(t for t in tuned.trials if t.status == "measured" and t is not best)
    # A predict limit just under the best candidate's measured time: the other one is chosen, if within it.
    limits = Limits(max_predict_ms=best.predict_ms * 0.999, budget_minutes=None)
    assert not check_limits(best, limits)[0]
    assert choose(tuned.trials, limits) is (other if other.predict_ms <= limits.max_predict_ms else None)
    # A fit limit under every estimate: nothing is chosen.
    assert choose(tuned.trials, Limits(max_fit_seconds=0.0, max_predict_ms=None)) is None
    # The rule itself, on measured values: the higher score wins unless it is over the limit.
    fast = Trial({"resize": 64}, "measured", 1.0, 1.0, 50.0, 0.8, 0.6, 0.7)
    slow = Trial({"resize": 512}, "measured", 9.0, 9.0, 400.0, 0.9, 0.9, 0.9)
    assert choose([fast, slow], Limits(max_predict_ms=None)) is slow
    assert choose([fast, slow], Limits(max_predict_ms=150)) is fast


def test_fixed_settings_win_and_duplicates_go():
    merged = candidate_list(CANDIDATES[:2] + [{"resize": 512}], {"resize": 64, "backbone": "efficientnet_lite0"})
    assert {m["resize"] for m in merged} == {64}
    assert len(merged) == 2  # the first two became one; the third differs by its bank share (the default)
    assert all(m["backbone"] == "efficientnet_lite0" for m in merged)


def test_the_tuning_record_is_saved_and_read_back(tuned, good_folder, tmp_path):
    model = fit_chosen(good_folder, tuned)
    assert model.n_training_images_ == 14  # the chosen setting, fitted on every good photo
    save_tuned(model, tmp_path / "model", tuned.record)
    record = tuning_record(tmp_path / "model")
    assert record["chosen"] == tuned.chosen.settings
    assert [t["status"] for t in record["trials"]] == [t.status for t in tuned.trials]
    assert history(tmp_path / "model")[-1]["who"] == "tune"
    loaded = PatchCore.load(tmp_path / "model")
    assert loaded.resize == tuned.chosen.settings["resize"]
    # A later save without tuning keeps the record findable.
    loaded.save(tmp_path / "model", event={"action": "save", "who": "test"})
    assert tuning_record(tmp_path / "model") == record
    model.save(tmp_path / "plain")
    assert tuning_record(tmp_path / "plain") is None


def test_the_table_prints_every_candidate(tuned):
    table = format_trials(tuned.trials, tuned.chosen)
    lines = table.splitlines()
    assert "ms/photo" in lines[0] and "image AUROC" in lines[0] and "AUPRO" in lines[0] and "within limits" in lines[0]
    assert len(lines) == 2 + len(tuned.trials)
    chosen_line = next(line for line in lines if line.startswith("*"))
    assert describe(tuned.chosen.settings) in chosen_line and f"{100 * tuned.chosen.aupro:.1f}" in chosen_line


def test_tune_command_saves_the_chosen_model(good_folder, tmp_path, capsys):
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps(CANDIDATES[:2]))
    assert main(["tune", str(good_folder), "-o", str(tmp_path / "model"), "--candidates", str(candidates),
                 "--max-predict-ms", "0", "--holdout-share", "0.3", "--defects-per-photo", "2",
                 "--defects-dir", str(tmp_path / "defects")]) == 0
    out = capsys.readouterr().out
    assert "image AUROC" in out and "chosen: lite0" in out
    record = tuning_record(tmp_path / "model")
    assert record["limits"]["max_predict_ms"] is None and len(record["trials"]) == 2
    assert record["held_out"]["good"] == 4 and record["held_out"]["defective"] == 8
    assert len(list((tmp_path / "defects").glob("*_mask.png"))) == 8


def test_fit_auto_stops_at_the_budget_and_refuses_impossible_limits(good_folder, tmp_path, capsys):
    assert main(["fit", str(good_folder), "--auto", "-o", str(tmp_path / "model"), "--backbone", "efficientnet_lite0",
                 "--coreset-ratio", "0.1", "--resize", "64", "--budget-minutes", "0", "--max-predict-ms", "0"]) == 0
    record = tuning_record(tmp_path / "model")
    statuses = [t["status"] for t in record["trials"]]
    assert statuses[0] == "measured" and set(statuses[1:]) <= {"not tried"} and len(statuses) > 1
    assert "fitted on 14 images" in capsys.readouterr().out
    assert main(["tune", str(good_folder), "-o", str(tmp_path / "none"), "--backbone", "efficientnet_lite0",
                 "--coreset-ratio", "0.1", "--resize", "64", "--max-predict-ms", "0.001", "--budget-minutes", "0"]) == 2
    assert "no candidate met the limits" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_tune_warns_when_the_machine_is_busy_and_only_then(monkeypatch):
    """Times per photo are measured as the machine is: on a busy one the predict limit leaves out
    candidates that an idle one would keep (bottle at load 7: every candidate above 384 px)."""
    import os

    from patchcore.cli import tune as tune_command

    monkeypatch.setattr("patchcore.engine.cpus.available_cpus", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.4, 6.0, 5.0))
    warning = tune_command.busy_warning(150.0)
    assert "load 7.4 on 2 cores" in warning and "--max-predict-ms 150" in warning
    assert tune_command.busy_warning(None) is None  # no predict limit: nothing to inflate
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert tune_command.busy_warning(150.0) is None
