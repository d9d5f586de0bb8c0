"""``patchcore export``: a saved model as a directory that runs without torch (ONNX or OpenVINO)."""

from __future__ import annotations

import argparse

from .options import cli_event


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "export", help="write a saved model as ONNX (or OpenVINO) that runs without torch",
        description="Export a saved model: the network as one ONNX graph (dynamic batch and image size) or OpenVINO "
                    "IR, the memory bank, settings and thresholds beside it, checksummed. 'patchcore predict' and "
                    "'patchcore serve' run the export with onnxruntime (or openvino); torch is not needed there.")
    parser.add_argument("model", metavar="MODEL_DIR", help="folder written by 'patchcore fit'")
    parser.add_argument("-o", "--output", required=True, metavar="EXPORT_DIR", help="folder for the export")
    parser.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                        help="onnx (default; runs with onnxruntime) or openvino (needs the openvino package)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.export import export_model
    from ..engine.model import PatchCore

    model = PatchCore.load(args.model)
    export_model(model, args.output, args.format, event=cli_event("export"))
    print(f"exported {args.model} as {args.format} to {args.output} (memory bank {model.memory_bank_.shape[0]} x "
          f"{model.memory_bank_.shape[1]}; run it with: patchcore predict {args.output} IMAGES -o OUT)")
    return 0
