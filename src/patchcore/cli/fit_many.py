"""``patchcore fit-many``: one model per folder of good images, on Ray or one after another."""

from __future__ import annotations

import argparse
import sys

from .options import add_model_options, model_settings_from_args, positive_int


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "fit-many", help="fit one model per sub-folder of good images (on Ray with --ray)",
        description="Fit one model per sub-folder of ROOT (one product line or camera each) into MODELS_DIR/<folder>: "
                    "the folder 'patchcore serve' serves. With --ray each folder is a Ray task; a folder that fails "
                    "is reported and the others finish.")
    parser.add_argument("root", metavar="ROOT", help="folder of folders of good images")
    parser.add_argument("-o", "--output", required=True, metavar="MODELS_DIR", help="folder for the models")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="fit on Ray: a local Ray, or the cluster at ADDRESS ('auto': the one this machine is in)")
    parser.add_argument("--cpus-per-task", type=positive_int, default=1, help="with --ray: cores per model (default: 1)")
    add_model_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..fleet.fit_many import fit_many

    settings = model_settings_from_args(args)
    results = fit_many(args.root, args.output, settings, ray=args.ray is not None, address=args.ray or None,
                       cpus_per_task=args.cpus_per_task)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} models fitted into {args.output}"
          + (f"; failed: {', '.join(r['folder'] for r in failed)}" if failed else ""))
    if failed:
        print("\n".join(f"error: {r['folder']}: {r['error']}" for r in failed), file=sys.stderr)
    return 1 if failed else 0
