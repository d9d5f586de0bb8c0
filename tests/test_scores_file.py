"""scores.csv: one set of columns, rows flushed as written, and the resume rules (retry failures,
repair a cut-off last line, refuse another model's file)."""

import csv

import pytest

from patchcore.engine.scores_file import COLUMNS, ScoresFile, ScoresFileError

MODEL = "a" * 64
OTHER = "b" * 64


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _scored_twice_and_one_failure(path):
    with ScoresFile.start(path, MODEL) as scores:
        scores.add("good.png", 1.25, False)
        scores.add("bad.png", 7.5, True)
        scores.add_failure("broken.png", "not an image")


def test_rows_have_one_set_of_columns_and_are_on_disk_before_the_file_is_closed(tmp_path):
    path = tmp_path / "scores.csv"
    with ScoresFile.start(path, MODEL) as scores:
        scores.add("good.png", 1.25, None)
        scores.add("bad.png", 7.5, True)
        scores.add_failure("broken.png", "not an image")
        on_disk = _rows(path)  # what a killed run would leave
    assert on_disk == [list(COLUMNS),
                       ["good.png", "1.250000", "", "", MODEL],
                       ["bad.png", "7.500000", "1", "", MODEL],
                       ["broken.png", "", "", "not an image", MODEL]]


def test_resume_counts_scored_images_as_done_and_retries_failed_ones(tmp_path):
    path = tmp_path / "scores.csv"
    _scored_twice_and_one_failure(path)
    with ScoresFile.resume(path, MODEL, retry=["good.png", "bad.png", "broken.png"]) as scores:
        assert scores.done == {"good.png", "bad.png"}
        assert [row[0] for row in _rows(path)[1:]] == ["good.png", "bad.png"]  # the failed row is gone ...
        scores.add("broken.png", 2.0, False)
    assert _rows(path)[-1] == ["broken.png", "2.000000", "0", "", MODEL]  # ... and its image has one row again
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_resume_keeps_the_failed_rows_of_images_not_scored_again(tmp_path):
    path = tmp_path / "scores.csv"
    _scored_twice_and_one_failure(path)
    before = path.read_text()
    with ScoresFile.resume(path, MODEL, retry=["other.png"]) as scores:
        assert scores.done == {"good.png", "bad.png"}
    assert path.read_text() == before


@pytest.mark.parametrize("tail", ['cut.png,3.1', '"cut\nin the name.png', 'cut.png,3.100000,0,,' + MODEL[:20]])
def test_resume_drops_a_cut_off_last_line(tmp_path, tail):
    path = tmp_path / "scores.csv"
    _scored_twice_and_one_failure(path)
    complete = _rows(path)
    with open(path, "a", newline="", encoding="utf-8") as handle:
        handle.write(tail)  # a run killed in the middle of writing a row
    with ScoresFile.resume(path, MODEL, retry=["cut.png"]) as scores:
        assert scores.done == {"good.png", "bad.png"}
        assert _rows(path) == complete
        scores.add("cut.png", 3.1, False)
    assert _rows(path) == [*complete, ["cut.png", "3.100000", "0", "", MODEL]]


def test_resume_of_a_file_cut_off_in_its_header_starts_it_again(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("path,score,is_anom")
    with ScoresFile.resume(path, MODEL, retry=[]) as scores:
        assert scores.done == set()
    assert _rows(path) == [list(COLUMNS)]


def test_resume_refuses_a_file_of_another_model(tmp_path):
    path = tmp_path / "scores.csv"
    with ScoresFile.start(path, OTHER) as scores:
        scores.add("good.png", 1.0, None)
    before = path.read_text()
    with pytest.raises(ScoresFileError) as refused:
        ScoresFile.resume(path, MODEL, retry=["new.png"], model_name="models/bottle")
    message = str(refused.value)
    assert str(path) in message and OTHER in message and f"{MODEL} (models/bottle)" in message
    assert "another output folder" in message
    assert path.read_text() == before  # left as it was


def test_resume_refuses_a_file_without_model_sha256(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("path,score,is_anomalous,error\ngood.png,1.000000,,\n")
    with pytest.raises(ScoresFileError, match="no model_sha256 column.*another output folder"):
        ScoresFile.resume(path, MODEL, retry=[])


def test_resume_refuses_a_damaged_row_in_the_middle(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text(",".join(COLUMNS) + "\ngood.png,1.0\n" + f"bad.png,2.000000,,,{MODEL}\n")
    with pytest.raises(ScoresFileError, match="row 2: 2 fields instead of 5"):
        ScoresFile.resume(path, MODEL, retry=[])


def test_start_replaces_an_existing_file_of_any_model(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("path,score\nold.png,1.0\n")
    with ScoresFile.start(path, MODEL) as scores:
        scores.add("new.png", 1.0, None)
    assert [row[0] for row in _rows(path)] == ["path", "new.png"]
