"""``patchcore rollback``: make an earlier version of a model current again, atomically."""

from __future__ import annotations

import argparse

from .options import cli_event


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "rollback", help="restore an earlier version of a model (undo a teach-in)",
        description="Make an earlier version of a model directory current again (default: the version before the "
                    "current one), atomically and as a new version, so the history keeps both. Scores after the "
                    "rollback equal those of the restored version bit for bit. 'patchcore history' lists versions.")
    parser.add_argument("model", metavar="MODEL_DIR", help="a saved or exported model directory")
    parser.add_argument("--to", type=int, default=None, metavar="VERSION",
                        help="the version to restore (default: the one before the current version)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.persistence import rollback

    event = cli_event("rollback")
    manifest = rollback(args.model, args.to, who=event["who"], details={"user": event["user"]})
    event = manifest["event"]
    print(f"{args.model}: version {event['to_version']} restored as version {manifest['version']} "
          f"(was version {event['from_version']})")
    return 0
