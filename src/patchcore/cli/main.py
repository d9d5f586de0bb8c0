"""The ``patchcore`` command: fit, tune, predict, add, history, rollback, export, demo, evaluate, experiment, serve,
watch, review, teach-token, backbones."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..engine.backbone_specs import REGISTRY
from ..errors import PatchCoreError
from .interrupts import Interrupted, StopOnSignals

#: Packages of the ``train`` extra: a command that needs one says how to install it.
TRAINING_MODULES = {"torch", "torchvision", "timm", "onnx", "sklearn", "matplotlib", "huggingface_hub", "elpv_dataset"}


def _backbones(args: argparse.Namespace) -> int:
    for spec in REGISTRY.values():
        print(f"{spec.name:20s} layers {','.join(spec.layers):18s} {spec.notes}")
    print("any other timm model name works too, e.g. --backbone resnet18 --layers layer2,layer3")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # The commands are imported here, not on import of this module: main() has its signal
    # handlers in place first, so that Ctrl-C while they load (half a second) stops cleanly too.
    from . import (add, demo, evaluate, experiment, export, fit, fit_many, history, predict, review, rollback, serve, teach_token,
                   tune, watch)

    parser = argparse.ArgumentParser(
        prog="patchcore",
        description="PatchCore anomaly detection: fit on images of good products, then score new images "
                    "and show where defects are.",
    )
    parser.add_argument("--version", action="version", version=f"patchcore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (fit, predict, add, history, rollback, export, fit_many, demo, evaluate, experiment, serve, teach_token,
                    watch, tune, review):
        command.add_parser(commands)
    backbones = commands.add_parser("backbones", help="list the known backbones", description="List the known backbones.")
    backbones.set_defaults(handler=_backbones)
    return parser


#: Commands that stop on SIGINT and SIGTERM by themselves (the server shuts down gracefully).
OWN_SIGNAL_HANDLING = {"serve"}


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. SIGINT or SIGTERM during a command stops it cleanly: a
    one-line message, temporary files removed, and the process ends at once with status 130 or
    143 (:mod:`.interrupts`)."""
    with StopOnSignals("patchcore") as stop:
        try:
            args = build_parser().parse_args(argv)
            stop.command = f"patchcore {args.command}"
            if args.command in OWN_SIGNAL_HANDLING:
                stop.release()
            return _run(args)
        except Interrupted:
            stop.finish()


def _run(args: argparse.Namespace) -> int:
    """The command's handler, with expected errors as one line on stderr and status 2."""
    try:
        return args.handler(args)
    except Interrupted:
        raise
    except (PatchCoreError, ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # serve, or a KeyboardInterrupt raised by other code
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in TRAINING_MODULES:
            print(f"error: 'patchcore {args.command}' needs {error.name}, which is not installed here; "
                  "install the training extra: pip install 'patchcore[train]' (exported models run without it)",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
