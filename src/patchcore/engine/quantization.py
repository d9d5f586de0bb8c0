"""int8 patch networks: ONNX Runtime's static quantisation of a float patch graph.

:func:`quantize_graph` turns the float graph that :mod:`.onnx_network` runs into one whose
convolutions run on 8-bit integers: weights per output channel (symmetric int8), activations per
tensor (asymmetric uint8) with ranges measured on a few calibration inputs (normalised training
photos: :func:`calibration_inputs`). The graph keeps its input and output (float32 pixels in,
float32 patch features out) and its dynamic batch and image size, so :class:`OnnxNetwork` runs it
as it runs the float one. Only ``onnxruntime`` (and ``onnx``, which it uses) are needed: no torch.

By default the convolutions and what lies between them (ReLU6, residual additions, padding) are
quantised, as integer operators (QOperator: ``QLinearConv``, 2.9x faster than float32 for
efficientnet_lite2 at batch 4 and 384 px on this project's 2-core EPYC, where the QDQ form ran
1.5x faster, with the same features); the patch-feature head (neighbourhood average, upsampling,
concatenation) stays float, so the features are not rounded to 256 levels per tensor on the way
out. Calibration is deterministic: the same graph and inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .onnx_network import INPUT_NAME

#: Calibration methods by name: the range of each activation from its extremes, from the
#: histogram's entropy (KL divergence), or from a percentile of its absolute values.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: QDQ: QuantizeLinear/DequantizeLinear pairs around float operators (fused by ONNX Runtime);
#: QOperator: integer operators (QLinearConv) in the graph itself.
FORMATS = ("qdq", "qoperator")
#: Operators quantised by default (on the data path only, see :func:`data_path_nodes`): the
#: convolutions, where the time goes, and what lies between them (ReLU6 as Clip, residual Add,
#: the "same" padding before strided convolutions), so that activations stay 8-bit from one
#: convolution to the next.
DEFAULT_OPERATORS = ("Conv", "Clip", "Add", "Pad")


def calibration_inputs(
    sources: Sequence, transform: Callable, count: int = 8, read: Callable | None = None,
    skip_unreadable: bool = False,
) -> list[np.ndarray]:
    """Network inputs ``(1, 3, H, W)`` of ``count`` of ``sources`` spread evenly over the list
    (the first, the last and between: the same photos every time), made by ``transform`` (a
    model's :class:`~patchcore.engine.geometry.InputTransform`) from each decoded photo.
    ``skip_unreadable``: a photo that cannot be read is left out (a fit that skips bad photos
    reports it when it reaches it) instead of raising its :class:`ImageLoadError`."""
    from ..errors import ImageLoadError
    from .images import read_image

    if not sources:
        raise ValueError("calibration needs at least one image")
    read = read or read_image
    picks = np.unique(np.linspace(0, len(sources) - 1, num=min(count, len(sources))).round().astype(int))
    inputs = []
    for i in picks:
        try:
            inputs.append(transform(read(sources[i], int(i)))[0][None])
        except ImageLoadError:
            if not skip_unreadable:
                raise
    if not inputs:
        raise ValueError("calibration needs at least one image: none of the photos chosen could be read")
    return inputs


class _NoPreprocessingAdvice(logging.Filter):
    """Drops the quantiser's advice to run its shape pre-processing, which cannot handle these graphs
    (symbolic shape inference stops at the dynamic "same" padding)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantiser without its chatter: the root logger's pre-processing advice, and the
    progress the histogram calibrators print."""
    advice = _NoPreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.getLogger().removeFilter(advice)


class _Inputs:
    """The calibration inputs as ONNX Runtime's ``CalibrationDataReader`` reads them: one run each."""

    def __init__(self, inputs: Iterable[np.ndarray]) -> None:
        self._inputs: Iterator[np.ndarray] = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        pixels = next(self._inputs, None)
        return None if pixels is None else {INPUT_NAME: np.ascontiguousarray(pixels, dtype=np.float32)}

    def rewind(self) -> None:  # pragma: no cover - called only by calibrators that read twice
        raise NotImplementedError


def quantize_graph(
    graph: bytes,
    calibration: Sequence[np.ndarray],
    method: str = "minmax",
    quant_format: str = "qoperator",
    per_channel: bool = True,
    operators: Sequence[str] = DEFAULT_OPERATORS,
    exclude: Sequence[str] = (),
    percentile: float = 99.999,
) -> bytes:
    """The int8 graph of the float ``graph`` (serialised ONNX), calibrated on ``calibration``: network
    inputs ``(batch, 3, H, W)`` float32, normalised as the model normalises photos.

    ``method``: one of :data:`CALIBRATION_METHODS` (``percentile`` keeps that percentile of each
    activation's absolute values). ``quant_format``: one of :data:`FORMATS`. ``per_channel``: a
    scale per output channel of each weight (else one per tensor). ``operators``: the operator types
    quantised; ``exclude``: node names left float.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if quant_format not in FORMATS:
        raise ValueError(f"quantisation format must be one of {', '.join(FORMATS)}, got {quant_format!r}")
    if not calibration:
        raise ValueError("calibration needs at least one input")
    import onnx

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    float_model = onnx.load_from_string(graph)
    kinds = {node.name: node.op_type for node in float_model.graph.node}
    chosen = [name for name in data_path_nodes(float_model) if kinds[name] in operators and name not in exclude]
    with tempfile.TemporaryDirectory(prefix="patchcore-int8-") as folder, _quiet():
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(graph)
        quantize_static(
            str(source), str(target), _Inputs(calibration),
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=list(operators), nodes_to_quantize=chosen, per_channel=per_channel,
            reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            extra_options={"CalibPercentile": percentile, "CalibTensorRangeSymmetric": False},
            # The calibrator's augmented graph and its intermediate files stay in this folder.
            calibration_providers=["CPUExecutionProvider"],
        )
        quantized = onnx.load(str(target))
    _tidy(quantized)
    return quantized.SerializeToString()


def data_path_nodes(model) -> list[str]:
    """Names of the nodes of ``model`` (an ``onnx.ModelProto``) that compute on the pixels' values,
    not on their shape: EfficientNet's "same" padding computes each Pad's amounts from ``Shape``
    with Sub, Add, Clip... in float, and quantising those would change the padding itself."""
    data = {value.name for value in model.graph.input}
    names = []
    for node in model.graph.node:  # ONNX graphs list nodes in topological order
        if node.op_type != "Shape" and any(name in data for name in node.input):
            names.append(node.name)
            data.update(node.output)
    return names


def _tidy(model) -> None:
    """Point every ``Shape`` that reads a DequantizeLinear's output at its 8-bit input (the same
    shape), so that no activation is turned back into float only to have its shape read; drop the
    DequantizeLinear nodes and the constants nothing reads any more (the bounds of each ReLU6 folded
    into its convolution: ONNX Runtime would warn about each one in every session)."""
    produced_by = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        source = produced_by.get(node.input[0]) if node.op_type == "Shape" else None
        if source is not None and source.op_type == "DequantizeLinear":
            node.input[0] = source.input[0]
    outputs = {value.name for value in model.graph.output}
    while True:
        read = {name for node in model.graph.node for name in node.input} | outputs
        unused = [node for node in model.graph.node
                  if node.op_type in ("DequantizeLinear", "Constant") and not any(name in read for name in node.output)]
        if not unused:
            break
        for node in unused:
            model.graph.node.remove(node)
    for initializer in [item for item in model.graph.initializer if item.name not in read]:
        model.graph.initializer.remove(initializer)


def graph_operators(graph: bytes | str | os.PathLike) -> dict[str, int]:
    """How many nodes of each operator type ``graph`` holds (e.g. ``QuantizeLinear``: quantised)."""
    import onnx

    model = onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(str(graph))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
