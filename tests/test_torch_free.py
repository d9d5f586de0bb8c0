"""Torch once per backbone (issue 17): with the network cache warm, fit, evaluate, predict and serve
run in processes where torch and timm cannot be imported, and score exactly as the torch path did.

The subprocesses block torch with an import hook (as if it were not installed). Putting ``None`` in
``sys.modules['torch']`` would not do here: scipy.stats, which scikit-learn imports, looks
``sys.modules['torch']`` up and fails on ``None``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from conftest import product_image, small_model_settings
from patchcore import PatchCore, load_model
from patchcore.engine import network_cache
from patchcore.engine.backbone_specs import resolve_spec
from patchcore.engine.devices import nvidia_driver_present

#: The training extra's modules that the torch-free paths must not import.
TORCH = ("torch", "timm", "torchvision")
#: And scikit-learn, which the base install (saved models, exports, the service) lacks too.
BASE_INSTALL_LACKS = TORCH + ("sklearn",)


def block(modules: tuple[str, ...]) -> str:
    """Code making the import of ``modules`` fail, as where they are not installed."""
    return f"""import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {modules!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Missing())
"""


def nothing_imported(modules: tuple[str, ...]) -> str:
    """Code checking, at the end of a script, that none of ``modules`` was imported."""
    return f"""
loaded = [m for m in sys.modules if m.split('.')[0] in {modules!r}]
assert not loaded, f'imported: {{loaded}}'
"""


BLOCK_TORCH = block(TORCH)
NOTHING_IMPORTED = nothing_imported(TORCH)
#: The command-line options of :func:`small_model_settings`.
FAST_OPTIONS = ["--backbone", "efficientnet_lite0", "--search-backend", "numpy", "--max-bank-size", "none",
                "--resize", "64", "--crop", "64", "--coreset-ratio", "0.25", "--batch-size", "4"]


def _run(code: str, cache: Path, block_torch: bool = True, missing: tuple[str, ...] = TORCH) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the network cache in ``cache`` where ``missing``
    cannot be imported (unless not ``block_torch``)."""
    env = {**os.environ, network_cache.CACHE_ENV: str(cache)}
    script = (block(missing) if block_torch else "import sys\n") + code + (nothing_imported(missing) if block_torch else "")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parent)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """This module's own network cache, filled by a fit in this process (with torch)."""
    folder = tmp_path_factory.mktemp("network-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(network_cache.CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def reference(cache, product_images, tmp_path_factory):
    """A model fitted here while the cache was empty (so with torch), saved, with its scores."""
    assert not (cache / "networks").exists()
    model = PatchCore(**small_model_settings()).fit(product_images["train"])
    assert "torch" in sys.modules and len(list((cache / "networks").iterdir())) == 1
    directory = tmp_path_factory.mktemp("saved") / "model"
    model.save(directory)
    images = [str(p) for p in product_images["good"] + product_images["defective"]]
    return {"model": model, "directory": directory, "images": images,
            "scores": [p.score for p in model.predict(images, maps=False)]}


def _plain_layout(root: Path) -> Path:
    """A tiny ``patchcore evaluate`` folder layout: train/, good/, one defect type with masks."""
    rng = np.random.default_rng(3)
    for folder in ("train", "good", "blotch", "masks/blotch"):
        (root / folder).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(product_image(rng)).save(root / "train" / f"t{i}.png")
    for i in range(2):
        Image.fromarray(product_image(rng)).save(root / "good" / f"g{i}.png")
        Image.fromarray(product_image(rng, defect=(20, 24, 14))).save(root / "blotch" / f"b{i}.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[20:34, 24:38] = 255
        Image.fromarray(mask).save(root / "masks" / "blotch" / f"b{i}.png")
    return root


def test_fit_evaluate_predict_export_and_serve_run_without_torch_and_score_as_the_torch_path(
        cache, reference, product_images, tmp_path):
    train = str(product_images["train"][0].parent)
    saved, images = str(reference["directory"]), reference["images"]
    layout = _plain_layout(tmp_path / "parts")
    code = f"""
import json
from patchcore import PatchCore, load_model
from patchcore.cli.main import main
codes = {{}}
codes['fit'] = main(['fit', {train!r}, '-o', {str(tmp_path / 'refit')!r}, *{FAST_OPTIONS!r}])
codes['evaluate'] = main(['evaluate', {str(layout)!r}, '-o', {str(tmp_path / 'evaluation')!r}, '--json', *{FAST_OPTIONS!r}])
codes['predict'] = main(['predict', {saved!r}, *{images!r}, '-o', {str(tmp_path / 'predictions')!r}, '--no-overlays'])
codes['export'] = main(['export', {saved!r}, '-o', {str(tmp_path / 'export')!r}])
from fastapi.testclient import TestClient
from patchcore.serving.app import create_app
client = TestClient(create_app({{'m': {saved!r}}}))
answer = client.post('/v1/models/m/predict', content=open({images[-1]!r}, 'rb').read(),
                     headers={{'content-type': 'image/png'}})
model = PatchCore.load({saved!r})
print(json.dumps({{'codes': codes, 'served': answer.json()['score'], 'loaded': [p.score for p in model.predict({images!r}, maps=False)],
                  'device': model.device_}}))
"""
    result = _run(code, cache)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["codes"] == {"fit": 0, "evaluate": 0, "predict": 0, "export": 0}
    assert got["device"] == "onnxruntime"
    # The saved model scores exactly as the model that was fitted with torch here.
    assert got["loaded"] == reference["scores"]
    assert got["served"] == reference["scores"][-1]
    with open(tmp_path / "predictions" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["score"]) for row in rows] == pytest.approx(reference["scores"], rel=1e-6, abs=1e-6)
    # Fitted without torch on the same images: the same memory bank and the same scores.
    refit = PatchCore.load(tmp_path / "refit")
    assert np.array_equal(refit.memory_bank_, reference["model"].memory_bank_)
    assert [p.score for p in refit.predict(images, maps=False)] == pytest.approx(reference["scores"], rel=1e-6)
    exported = load_model(tmp_path / "export")  # exported without torch too
    assert [p.score for p in exported.predict(images, maps=False)] == reference["scores"]
    metrics = json.loads((tmp_path / "evaluation" / "parts" / "metrics.json").read_text())
    assert metrics.get("error") is None
    assert metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] is not None


def test_torch_and_onnx_runtime_give_the_same_scores(reference):
    """The cached graph computes what the torch module computes: the same memory bank scored by
    torch's eager mode (a module made from the saved weights) gives the same scores to 1e-6."""
    from patchcore.cli.options import use_device

    model = PatchCore.load(reference["directory"]).set_params(runtime="torch")
    use_device(model, "cpu")
    assert model.device_ == "torch"
    scores = [p.score for p in model.predict(reference["images"], maps=False)]
    assert scores == pytest.approx(reference["scores"], rel=1e-6)


@pytest.mark.skipif(nvidia_driver_present(), reason="for machines without an NVIDIA driver")
def test_device_auto_does_not_import_torch_where_there_is_no_nvidia_driver(cache, reference, product_images):
    train = [str(p) for p in product_images["train"]]
    code = f"""
from patchcore import PatchCore, load_model
from conftest import small_model_settings
model = PatchCore(**small_model_settings(), device='auto').fit({train!r})
assert model.device_ == 'onnxruntime'
{NOTHING_IMPORTED}
"""
    result = _run(code, cache, block_torch=False)  # torch is importable: it must simply not be needed
    assert result.returncode == 0, result.stderr


def test_a_cache_miss_without_torch_says_that_torch_is_needed_once_per_backbone(tmp_path, product_images):
    train = str(product_images["train"][0].parent)
    code = f"""
from patchcore.cli.main import main
print('exit', main(['fit', {train!r}, '-o', {str(tmp_path / 'model')!r}, *{FAST_OPTIONS!r}]))
"""
    result = _run(code, tmp_path / "empty-cache")
    assert result.returncode == 0 and result.stdout.strip().endswith("exit 2"), result.stderr
    message = result.stderr
    assert "torch is needed once per backbone" in message and "pip install 'patchcore[train]'" in message
    assert str(tmp_path / "empty-cache") in message and "efficientnet_lite0" in message
    assert not (tmp_path / "model").exists()


def test_a_saved_model_carries_its_graph_loads_without_torch_or_cache_and_fills_the_cache(reference, tmp_path,
                                                                                          product_images):
    """Scored and served as the base install would (no torch, timm nor scikit-learn), with an empty cache."""
    graphs = list(reference["directory"].glob("network-*.onnx"))
    assert len(graphs) == 1
    manifest = json.loads((reference["directory"] / "patchcore.json").read_text())
    key = manifest["state"]["network"]["cache_key"]
    empty = tmp_path / "cache"
    train = [str(p) for p in product_images["train"]]
    code = f"""
import json
from patchcore import PatchCore, load_model
from conftest import small_model_settings
model = PatchCore.load({str(reference['directory'])!r})
scores = [p.score for p in model.predict({reference['images']!r}, maps=False)]
refit = PatchCore(**small_model_settings()).fit({train!r})  # the cache now holds the backbone's graph
from fastapi.testclient import TestClient
from patchcore.serving.app import create_app
client = TestClient(create_app({{'m': {str(reference['directory'])!r}}}))
served = client.post('/v1/models/m/predict', content=open({reference['images'][0]!r}, 'rb').read(),
                     headers={{'content-type': 'image/png'}}).json()['score']
print(json.dumps({{'scores': scores, 'refit': [p.score for p in refit.predict({reference['images']!r}, maps=False)],
                  'served': served}}))
"""
    result = _run(code, empty, missing=BASE_INSTALL_LACKS)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["scores"] == reference["scores"] and got["refit"] == reference["scores"]
    assert got["served"] == reference["scores"][0]
    assert network_cache.lookup(key, empty) is not None


def _strip_graph(directory: Path) -> None:
    """Make ``directory`` a model as saved before models kept their graph (format 3 without it)."""
    manifest = json.loads((directory / "patchcore.json").read_text())
    graph = manifest["files"].pop("network")
    manifest["state"].pop("network")
    (directory / graph["file"]).unlink()
    (directory / "patchcore.json").write_text(json.dumps(manifest))


def test_a_model_saved_without_its_graph_loads_with_torch_once_then_without(reference, tmp_path, monkeypatch):
    reference["model"].save(tmp_path / "old")
    _strip_graph(tmp_path / "old")
    cache = tmp_path / "cache"
    load = f"""
import json
from patchcore import PatchCore, load_model
model = PatchCore.load({str(tmp_path / 'old')!r})
print(json.dumps([p.score for p in model.predict({reference['images']!r}, maps=False)]))
"""
    refused = _run(load, cache)
    assert refused.returncode != 0 and "torch is needed once per backbone" in refused.stderr
    monkeypatch.setenv(network_cache.CACHE_ENV, str(cache))
    with_torch = PatchCore.load(tmp_path / "old")  # builds the graph from the model's weights, caches it
    assert [p.score for p in with_torch.predict(reference["images"], maps=False)] == reference["scores"]
    without = _run(load, cache)
    assert without.returncode == 0, without.stderr
    assert json.loads(without.stdout.strip().splitlines()[-1]) == reference["scores"]
    with_torch.save(tmp_path / "old")  # saved again: now with its graph
    assert len(list((tmp_path / "old").glob("network-*.onnx"))) == 1


def test_two_processes_filling_the_same_entry_at_once_both_succeed_and_leave_one_valid_entry(reference, tmp_path):
    graph = reference["model"].network_
    (tmp_path / "graph.onnx").write_bytes(graph.graph_bytes())
    save_file(graph.weight_arrays(), str(tmp_path / "weights.safetensors"))
    cache, go = tmp_path / "cache", tmp_path / "go"
    code = f"""
import json, pathlib, time
from safetensors.numpy import load_file
from patchcore.engine import network_cache
parts = network_cache.NetworkParts(pathlib.Path({str(tmp_path / 'graph.onnx')!r}).read_bytes(),
                                   load_file({str(tmp_path / 'weights.safetensors')!r}), {graph.stride}, {graph.cell},
                                   {tuple(graph.channels)!r}, {graph.width})
pathlib.Path(sys.argv[1]).touch()  # ready: both commit at about the same moment
while not pathlib.Path({str(go)!r}).exists():
    time.sleep(0.001)
stored = network_cache.store('0123456789abcdef0123456789abcdef', parts, {str(cache)!r})
print(json.dumps([stored.key, stored.graph_sha256, str(stored.graph)]))
"""
    ready = [tmp_path / "ready-0", tmp_path / "ready-1"]
    script = BLOCK_TORCH + code + NOTHING_IMPORTED
    writers = [subprocess.Popen([sys.executable, "-c", script, str(flag)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for flag in ready]
    try:
        while not all(flag.exists() for flag in ready):
            assert all(writer.poll() is None for writer in writers), [w.communicate()[1] for w in writers]
            time.sleep(0.01)  # polling for the writers' flags
        go.touch()
        outputs = [writer.communicate(timeout=300) for writer in writers]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
    assert all(writer.returncode == 0 for writer in writers), [err for _, err in outputs]
    answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert answers[0] == answers[1]  # both got the same entry
    assert answers[0][1] == graph.graph_sha256
    entries = sorted(p.name for p in (cache / "networks").iterdir())
    assert entries == [answers[0][0]]  # one entry, no temporary folders left
    assert network_cache.lookup(answers[0][0], cache) is not None


def test_a_corrupted_cache_file_is_detected_and_rebuilt(cache, reference, product_images):
    key = reference["model"].network_.key
    entry = cache / "networks" / key
    for name in (network_cache.GRAPH_FILE, network_cache.WEIGHTS_FILE):
        path = entry / name
        good = path.read_bytes()
        damaged = bytearray(good)
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
        model = PatchCore(**small_model_settings()).fit(product_images["train"])  # detects it, builds it again
        assert model.network_.key == key and path.read_bytes() == good
        assert [p.score for p in model.predict(reference["images"], maps=False)] == reference["scores"]
    (entry / network_cache.ENTRY_FILE).write_text("{ not json")
    assert network_cache.lookup(key) is None and not entry.exists()
    PatchCore(**small_model_settings()).fit(product_images["train"][:2])  # the entry again, for the other tests
    assert network_cache.lookup(key) is not None


def test_the_key_depends_on_what_the_graph_depends_on_only():
    spec = resolve_spec("efficientnet_lite0")
    key = network_cache.graph_key(spec, "a" * 64, None, 3)
    assert network_cache.graph_key(resolve_spec("efficientnet_lite0"), "a" * 64, None, 3) == key
    from dataclasses import replace

    assert network_cache.graph_key(replace(spec, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), "a" * 64, None, 3) == key
    different = [network_cache.graph_key(spec, "b" * 64, None, 3), network_cache.graph_key(spec, "a" * 64, 64, 3),
                 network_cache.graph_key(spec, "a" * 64, None, 5),
                 network_cache.graph_key(replace(spec, layers=("blocks.1", "blocks.2")), "a" * 64, None, 3),
                 network_cache.graph_key(replace(spec, feature_location="expansion"), "a" * 64, None, 3)]
    assert len({key, *different}) == 1 + len(different)


def test_random_weights_are_not_cached(tmp_path, product_images, monkeypatch):
    monkeypatch.setenv(network_cache.CACHE_ENV, str(tmp_path / "cache"))
    model = PatchCore(**small_model_settings(weights="random")).fit(product_images["train"][:3])
    assert model.network_.key is None and not (tmp_path / "cache" / "networks").exists()
    model.save(tmp_path / "model")  # saved with its graph all the same
    assert PatchCore.load(tmp_path / "model").predict(product_images["defective"][0])[0].score == \
        model.predict(product_images["defective"][0])[0].score


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(network_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert network_cache.cache_directory() == tmp_path / "xdg" / "patchcore"
    monkeypatch.setenv(network_cache.CACHE_ENV, str(tmp_path / "own"))
    assert network_cache.cache_directory() == tmp_path / "own"
    assert network_cache.cache_directory(tmp_path / "given") == tmp_path / "given"


def test_an_int8_model_fits_predicts_and_exports_without_torch(cache, reference, product_images, tmp_path):
    """Quantising needs onnx, not torch: with the cache warm, ``fit --network-precision int8``, then
    predict, export and load of that model run where torch cannot be imported, and score as an int8
    model fitted here with torch does (the same calibration photos, the same int8 graph)."""
    from patchcore.engine.quantization import graph_operators

    train, model_dir, images = str(product_images["train"][0].parent), tmp_path / "int8", reference["images"]
    code = f"""
import json
from patchcore import PatchCore, load_model
from patchcore.cli.main import main
codes = {{'fit': main(['fit', {train!r}, '-o', {str(model_dir)!r}, '--network-precision', 'int8', *{FAST_OPTIONS!r}])}}
codes['predict'] = main(['predict', {str(model_dir)!r}, *{images!r}, '-o', {str(tmp_path / 'predictions')!r}, '--no-overlays'])
codes['export'] = main(['export', {str(model_dir)!r}, '-o', {str(tmp_path / 'export')!r}])
model = PatchCore.load({str(model_dir)!r})
exported = load_model({str(tmp_path / 'export')!r})
print(json.dumps({{'codes': codes, 'loaded': [p.score for p in model.predict({images!r}, maps=False)],
                  'exported': [p.score for p in exported.predict({images!r}, maps=False)]}}))
"""
    result = _run(code, cache)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["codes"] == {"fit": 0, "predict": 0, "export": 0}
    with_torch = PatchCore(**small_model_settings(network_precision="int8")).fit(product_images["train"])
    expected = [p.score for p in with_torch.predict(images, maps=False)]
    assert got["loaded"] == expected and got["exported"] == expected
    assert got["loaded"] != reference["scores"]  # not the float network
    with open(tmp_path / "predictions" / "scores.csv", newline="") as handle:
        assert [float(row["score"]) for row in csv.DictReader(handle)] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    graph = next(model_dir.glob("network-*.onnx")).read_bytes()
    assert graph == with_torch.network_.graph_bytes() and graph_operators(graph).get("QLinearConv", 0) > 0
