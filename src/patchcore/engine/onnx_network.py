"""The patch network as an ONNX graph run by ONNX Runtime: 3-4x faster than torch's eager mode
for EfficientNet-Lite on a plain CPU (measured on this project's 2-core Xeon), and needs no torch.

:func:`export_network` (needs torch) writes a :class:`~patchcore.engine.embedding.PatchNetwork`
as a graph with a dynamic batch and image size, once per backbone (:mod:`.network_cache` keeps
it); :class:`OnnxNetwork` (needs only onnxruntime) runs one: in fits, saved models and exports.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

from .cpus import available_cpus

#: ONNX operator set of exported graphs (ONNX Runtime 1.16 and later run it).
OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "patch_features"
#: Side of the input of :meth:`OnnxNetwork.release_memory`'s run: a multiple of every backbone's
#: deepest stride (32 at most), small enough to cost about a millisecond.
RELEASE_SIDE = 64


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_network(network, example_size: tuple[int, int] = (256, 256)) -> bytes:
    """The serialised ONNX graph of ``network`` (a torch ``PatchNetwork``): input ``pixels``
    ``(batch, 3, height, width)``, output ``patch_features`` ``(batch, rows, cols, width)``, with
    batch and image size dynamic (sizes must be multiples of the network's deepest stride)."""
    import torch

    height, width = (-(-side // network.stride) * network.stride for side in example_size)
    example = torch.zeros(1, 3, height, width)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on traced shapes and deprecations
        torch.onnx.export(
            network.eval(), (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "rows", 2: "cols"}},
            opset_version=OPSET, dynamo=False,
        )
    return buffer.getvalue()


class OnnxNetwork:
    """Runs an exported patch network: numpy pixels in, numpy patch features out.

    ``threads``: ONNX Runtime's intra-op threads (default: every core this process may use). Its worker threads do not
    spin while they wait for work: on a shared machine spinning threads slowed every step down.

    ONNX Runtime keeps the memory of a run's activations in its arena for the next run: 280 MB
    for efficientnet_lite2 at 384 pixels and batch 4. Handing it back after every run cost each
    run the page faults of fresh memory, 15 ms per 900x900 photo at the defaults (67 vs 53 ms per
    photo on this project's 2-core Xeon), so runs keep it and :meth:`release_memory` hands it back
    after a call's last batch (:func:`~patchcore.engine.detector.embed_batches` does when a call
    ran several batches, so that ``evaluate``'s pixel metrics or a fit's coreset do not sit
    beside it; a service scoring one photo per request keeps one photo's arena).
    """

    def __init__(self, graph: bytes | str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(1, threads or available_cpus())
        options.inter_op_num_threads = 1
        # The memory pattern pre-plans a second block beside the arena's (55 MB more at the
        # defaults on bottle, no faster here).
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = graph if isinstance(graph, bytes) else str(graph)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        inputs = {INPUT_NAME: np.ascontiguousarray(pixels, dtype=np.float32)}
        return self.session.run([OUTPUT_NAME], inputs)[0]

    def release_memory(self) -> None:
        """Hand the arena's free memory back to the system: a run on a small input that shrinks
        the arena when it ends (ONNX Runtime shrinks only at the end of a run)."""
        inputs = {INPUT_NAME: np.zeros((1, 3, RELEASE_SIDE, RELEASE_SIDE), dtype=np.float32)}
        self.session.run([OUTPUT_NAME], inputs, self._shrink)
