"""Files written whole or not at all, with every temporary name known while it is written."""

import os

import pytest

from patchcore.engine.atomic_files import PENDING_TEMPORARY, atomic_path


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            assert temporary in PENDING_TEMPORARY and temporary.parent == tmp_path
            temporary.write_text("half of the new")
            raise RuntimeError("stopped mid-write")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
    assert not PENDING_TEMPORARY


def test_a_write_that_ends_replaces_the_file_in_one_step(tmp_path):
    target = tmp_path / "scores.csv"
    with atomic_path(target, durable=True) as temporary:
        temporary.write_text("path,score\n")
        assert not target.exists()  # nothing visible under the real name until the rename
    assert target.read_text() == "path,score\n" and os.listdir(tmp_path) == ["scores.csv"]
    assert not PENDING_TEMPORARY
