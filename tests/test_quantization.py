"""The int8 patch network: ONNX Runtime static quantisation of the float graph (patchcore.engine.quantization)."""

import numpy as np
import pytest
from PIL import Image

from conftest import MVTEC_BOTTLE, product_image
from patchcore.engine.onnx_network import OnnxNetwork
from patchcore.engine.quantization import (
    CALIBRATION_METHODS,
    calibration_inputs,
    data_path_nodes,
    graph_operators,
    quantize_graph,
)

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def float_graph(fitted_model) -> bytes:
    """efficientnet_lite0's patch graph (the engine tests' backbone), as the fitted model runs it."""
    return fitted_model.network_.graph_bytes()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    """Six 160x120 photos of the woven product: real-ish inputs, larger than the 64 px test images."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(6):
        paths.append(folder / f"{i}.png")
        Image.fromarray(product_image(rng, (120, 160), defect=(40, 60, 16) if i == 5 else None)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def transform(fitted_model):
    from patchcore.engine.geometry import InputTransform

    spec = fitted_model.backbone_spec_
    return InputTransform(None, None, spec.mean, spec.std, fitted_model.network_.stride, fitted_model.network_.cell)


@pytest.fixture(scope="module")
def int8_graph(float_graph, photos, transform) -> bytes:
    return quantize_graph(float_graph, calibration_inputs(photos[:4], transform, 4))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_the_int8_graph_runs_on_8_bit_convolutions_and_keeps_the_features_shape(float_graph, int8_graph, transform,
                                                                                photos):
    operators = graph_operators(int8_graph)
    assert operators.get("QLinearConv", 0) == graph_operators(float_graph)["Conv"] and "Conv" not in operators
    float_network, int8_network = OnnxNetwork(float_graph), OnnxNetwork(int8_graph)
    pixels = np.concatenate(calibration_inputs(photos, transform, 6))
    for batch in (pixels[:1], pixels, pixels[:2, :, :64, :96]):  # dynamic batch and size, as the float graph
        expected, got = float_network(batch), int8_network(batch)
        assert got.shape == expected.shape and got.dtype == np.float32


def test_int8_features_follow_the_float_features(float_graph, int8_graph, transform, photos):
    """On photos it was not calibrated on (one with a defect), the int8 features correlate with the
    float32 features at 0.99 or better (measured: 0.9993 here; efficientnet_lite2 on bottle: 0.997)."""
    held_out = np.concatenate(calibration_inputs(photos[4:], transform, 2))
    expected, got = OnnxNetwork(float_graph)(held_out), OnnxNetwork(int8_graph)(held_out)
    assert _correlation(expected, got) >= 0.99
    # Nearest neighbours survive: most int8 patches find their own float32 twin among the float patches.
    flat_expected, flat_got = expected.reshape(-1, expected.shape[-1]), got.reshape(-1, got.shape[-1])
    distances = ((flat_got[:, None, :] - flat_expected[None, :, :]) ** 2).sum(-1)
    assert np.mean(distances.argmin(axis=1) == np.arange(len(flat_got))) >= 0.9


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_calibration_is_deterministic(float_graph, photos, transform, method):
    inputs = calibration_inputs(photos[:3], transform, 3)
    first = quantize_graph(float_graph, inputs, method=method)
    assert first == quantize_graph(float_graph, calibration_inputs(photos[:3], transform, 3), method=method)


def test_shape_arithmetic_stays_float(float_graph, int8_graph):
    """EfficientNet's "same" padding computes its amounts from Shape; none of those nodes is
    quantised (it would change the padding), and no activation is dequantised only for Shape."""
    import onnx

    model = onnx.load_from_string(float_graph)
    data = set(data_path_nodes(model))
    shape_side = [node for node in model.graph.node if node.name not in data and node.op_type in ("Add", "Clip")]
    assert shape_side, "the graph computes its padding from shapes"
    quantized = onnx.load_from_string(int8_graph)
    produced_by = {output: node.op_type for node in quantized.graph.node for output in node.output}
    assert all(produced_by.get(node.input[0]) != "DequantizeLinear" for node in quantized.graph.node
               if node.op_type == "Shape")


def test_calibration_photos_are_spread_evenly_and_fixed(photos, transform):
    calls = []

    def read(source, position):
        calls.append(position)
        return Image.open(source).convert("RGB")

    inputs = calibration_inputs(photos, transform, 3, read=read)
    assert calls == [0, 2, 5] and all(x.shape[:2] == (1, 3) for x in inputs)
    with pytest.raises(ValueError, match="at least one"):
        calibration_inputs([], transform)


def test_bad_choices_are_refused(float_graph):
    with pytest.raises(ValueError, match="calibration method"):
        quantize_graph(float_graph, [np.zeros((1, 3, 32, 32), np.float32)], method="mean")
    with pytest.raises(ValueError, match="format"):
        quantize_graph(float_graph, [np.zeros((1, 3, 32, 32), np.float32)], quant_format="int4")
    with pytest.raises(ValueError, match="at least one"):
        quantize_graph(float_graph, [])


@pytest.mark.slow
@pytest.mark.skipif(not MVTEC_BOTTLE.is_dir(), reason=f"MVTec AD bottle data not found at {MVTEC_BOTTLE}")
def test_default_backbone_on_bottle_photos():
    """efficientnet_lite2 at the defaults, calibrated on 4 bottle training photos: on 4 test photos
    (broken and good) the features correlate with float32's at 0.995 or better (measured: 0.997)."""
    from patchcore import PatchCore
    from patchcore.engine.backbone_specs import resolve_spec

    model = PatchCore()
    spec = resolve_spec(model.backbone, model.layers, model.feature_location)
    model._build(spec, *model._patch_graph(spec))
    train = sorted((MVTEC_BOTTLE / "train" / "good").glob("*.png"))
    test = sorted((MVTEC_BOTTLE / "test" / "broken_large").glob("*.png"))[:2] + sorted(
        (MVTEC_BOTTLE / "test" / "good").glob("*.png"))[:2]
    graph = model.network_.graph_bytes()
    int8 = quantize_graph(graph, calibration_inputs(train, model.transform_, 4), quant_format="qoperator")
    pixels = np.concatenate(calibration_inputs(test, model.transform_, 4))
    assert _correlation(OnnxNetwork(graph)(pixels), OnnxNetwork(int8)(pixels)) >= 0.995
