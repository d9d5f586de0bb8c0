"""Model versions: every save is a new version, the history records it, rollback restores one exactly."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from conftest import product_image, small_model_settings
from patchcore import PatchCore, load_model
from patchcore.cli.main import main
from patchcore.engine import persistence
from patchcore.engine.export import export_model


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(21)
    train = [product_image(rng, (64, 96)) for _ in range(8)]
    new_material = [np.clip(product_image(rng, (64, 96)) * np.array([1.25, 1.0, 0.8]), 0, 255).astype(np.uint8)
                    for _ in range(4)]
    probes = [product_image(rng, (64, 96)), product_image(rng, (64, 96), defect=(20, 40, 12)), new_material[-1]]
    model = PatchCore(**small_model_settings(resize=64, crop=None)).fit(train)
    return model, new_material[:-1], probes


def _write_images(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(arrays):
        paths.append(folder / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


@pytest.mark.parametrize("kind", ["saved", "export"])
def test_rollback_after_teach_in_gives_the_scores_from_before_bit_for_bit(parts, tmp_path, kind):
    model, new_material, probes = parts
    directory = tmp_path / kind
    if kind == "saved":
        model.save(directory, event={"action": "fit", "who": "test"})
    else:
        export_model(model, directory)
    before = load_model(directory)
    scores_before = [p.score for p in before.predict(probes)]
    maps_before = [p.anomaly_map for p in before.predict(probes)]
    good = _write_images(tmp_path / "good", new_material)
    assert main(["add", str(directory), str(tmp_path / "good")]) == 0
    taught = load_model(directory)
    assert taught.memory_bank_.shape[0] > before.memory_bank_.shape[0]
    assert [p.score for p in taught.predict(probes)] != scores_before
    assert main(["rollback", str(directory)]) == 0
    restored = load_model(directory)
    assert [p.score for p in restored.predict(probes)] == scores_before
    assert all(np.array_equal(a.anomaly_map, b) for a, b in zip(restored.predict(probes), maps_before))
    assert np.array_equal(restored.memory_bank_, before.memory_bank_)
    entries = persistence.history(directory)
    assert [e["action"] for e in entries] == ["fit" if kind == "saved" else "export", "teach-in", "rollback"]
    assert [e["version"] for e in entries] == [1, 2, 3] and entries[-1]["current"] and entries[-1]["to_version"] == 1
    teach_in = entries[1]
    assert teach_in["who"] == "cli" and teach_in["images"] == len(good)
    assert sorted(s["sha256"] for s in teach_in["sources"]) == sorted(
        hashlib.sha256(p.read_bytes()).hexdigest() for p in good)
    assert teach_in["bank_size"] == taught.memory_bank_.shape[0]
    # The taught version can be restored too: rollback is itself undone by a rollback.
    assert main(["rollback", str(directory), "--to", "2"]) == 0
    assert np.array_equal(load_model(directory).memory_bank_, taught.memory_bank_)


def test_history_command_lists_versions_and_rollback_refuses_what_it_cannot_restore(parts, tmp_path, capsys):
    model, new_material, _ = parts
    directory = tmp_path / "m"
    model.save(directory, event={"action": "fit", "who": "cli"})
    for i in range(3):
        model.save(directory, keep_versions=2)
    assert main(["history", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:-1]]
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
    assert [row[5] for row in rows] == ["no", "no", "yes", "yes"]  # only the last two are kept
    assert lines[-2].endswith("*")
    assert main(["rollback", str(directory), "--to", "1"]) == 2
    assert "version 1 cannot be restored" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already the current version"):
        persistence.rollback(directory, to=4)
    assert main(["history", str(directory), "--json"]) == 0
    parsed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert parsed[0]["action"] == "fit" and parsed[0]["who"] == "cli" and len(parsed[0]["manifest_sha256"]) == 64


def test_a_directory_from_before_versions_counts_as_version_one_and_stays_restorable(parts, tmp_path):
    model, _, probes = parts
    directory = tmp_path / "old"
    model.save(directory)
    # As patchcore 0.2 left it: no version number, no versions/ folder, no history.
    manifest = json.loads((directory / "patchcore.json").read_text())
    del manifest["version"], manifest["event"]
    (directory / "patchcore.json").write_text(json.dumps(manifest))
    for path in (directory / "versions").iterdir():
        path.unlink()
    (directory / "versions").rmdir()
    (directory / "history.jsonl").unlink()
    scores = [p.score for p in load_model(directory).predict(probes, maps=False)]
    other = PatchCore(**small_model_settings(resize=64, crop=None, coreset_ratio=0.05)).fit(probes[:1])
    other.save(directory)
    assert persistence.read_manifest(directory)["version"] == 2
    persistence.rollback(directory)
    assert [p.score for p in load_model(directory).predict(probes, maps=False)] == scores


def test_two_writers_never_lose_a_version(parts, tmp_path):
    import threading

    model, _, _ = parts
    directory = tmp_path / "shared"
    model.save(directory)
    barrier = threading.Barrier(4)

    def save_one():
        barrier.wait()
        model.save(directory)

    threads = [threading.Thread(target=save_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e["version"] for e in persistence.history(directory)] == [1, 2, 3, 4, 5]


def test_the_last_ten_versions_stay_restorable_by_default(parts, tmp_path):
    model, _, _ = parts
    directory = tmp_path / "m"
    for _ in range(12):
        model.save(directory)
    entries = persistence.history(directory)
    assert [e["version"] for e in entries if e["restorable"]] == list(range(3, 13))
    assert len(list((directory / "versions").glob("*.json"))) == 10
