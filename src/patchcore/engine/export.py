"""``patchcore export``: a fitted model as a directory that runs without torch.

The network half (backbone and patch features) becomes one ONNX graph with a dynamic batch and
image size (or, where the ``openvino`` package is installed, OpenVINO IR made from it); the
memory bank, the settings and the thresholds go beside it, checksummed, as in a saved model.
:class:`~patchcore.engine.runtime.ExportedModel` loads and scores it with onnxruntime (or
openvino), numpy, scipy, Pillow and faiss only. The graph is the one the model itself runs
(:mod:`.network_cache`), so exporting needs no torch either.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import persistence
from .onnx_network import OPSET

FORMATS = ("onnx", "openvino")

def _openvino_ir(onnx_graph: bytes) -> tuple[bytes, bytes]:
    """(``.xml``, ``.bin``) of the OpenVINO IR made from an ONNX graph."""
    try:
        import openvino as ov
    except ImportError:
        raise ValueError("--format openvino needs the openvino package: pip install openvino") from None
    with tempfile.TemporaryDirectory() as folder:
        graph = Path(folder) / "network.onnx"
        graph.write_bytes(onnx_graph)
        ov.save_model(ov.convert_model(str(graph)), str(Path(folder) / "network.xml"), compress_to_fp16=False)
        return (Path(folder) / "network.xml").read_bytes(), (Path(folder) / "network.bin").read_bytes()


def export_model(model, directory: str | os.PathLike, format: str = "onnx", event: dict | None = None) -> Path:
    """Write fitted PatchCore ``model`` to ``directory`` as an export (atomically, as a new version,
    like a save). It keeps every setting of the model, so that teach-in on the export adds exactly
    what it adds on the saved model."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    model._check_fitted()
    if format == "openvino" and model.settings().network_precision == "int8":
        raise ValueError("an int8 network exports as ONNX only (OpenVINO cannot convert its QLinearConv nodes): use "
                         "--format onnx, or export a float32 model to OpenVINO")
    graph = model.network_.graph_bytes()  # the graph the model runs: no torch needed
    if format == "onnx":
        blobs = {"network": (".onnx", graph)}
    else:
        xml, weights = _openvino_ir(graph)
        blobs = {"network": (".xml", xml), "network_weights": (".bin", weights)}
    spec = model.backbone_spec_
    settings = model.settings().to_json()
    state = {
        "runtime": format,
        "onnx_opset": OPSET,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "stride": model.network_.stride,
        "cell": model.network_.cell,
        "feature_width": model.network_.width,
        "layers": list(spec.layers),
        **model.decision_state(),
        **model.bank_state(),
    }
    return persistence.write_model(directory, settings, state, {"memory_bank": model.bank_tensors()},
                                   blobs=blobs, format_name=persistence.EXPORT_FORMAT_NAME,
                                   event=model.version_event({"action": "export", **(event or {})}))
