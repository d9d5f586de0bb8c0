"""``patchcore history``: every version of a model directory, what made it, who, and what it holds."""

from __future__ import annotations

import argparse
import json


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "history", help="list a model's versions (fit, teach-in, rollback): when, who, images, bank size",
        description="List every version written to a model directory, oldest first: when, what made it (fit, "
                    "teach-in, rollback, export, save), who (a teach-in token's name, or cli), the images taught "
                    "in (count and SHA-256), the memory bank's size, and whether 'patchcore rollback' can "
                    "still restore it.")
    parser.add_argument("model", metavar="MODEL_DIR", help="a saved or exported model directory")
    parser.add_argument("--json", action="store_true", help="print the versions as JSON lines")
    parser.set_defaults(handler=run)


def _images(entry: dict) -> str:
    sources = entry.get("sources") or []
    if not sources:
        return str(entry.get("images", "")) if entry.get("images") is not None else ""
    shown = ", ".join(f"{source['sha256'][:12]}" for source in sources[:3]) + (", ..." if len(sources) > 3 else "")
    return f"{len(sources)} ({shown})"


def run(args: argparse.Namespace) -> int:
    from ..engine.persistence import history

    entries = history(args.model)
    if args.json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return 0
    print(f"{'version':>7}  {'when (UTC)':20}  {'action':9}  {'who':14}  {'bank':>7}  {'restorable':10}  images (SHA-256)")
    for entry in entries:
        action = entry.get("action", "")
        if action == "rollback":
            action = f"rollback to {entry.get('to_version')}"
        marker = " *" if entry.get("current") else ""
        bank = entry.get("bank_size")
        print(f"{entry.get('version', ''):>7}  {entry.get('at') or '':20}  {action:9}  {entry.get('who', ''):14}  "
              f"{bank if bank is not None else '':>7}  {'yes' if entry.get('restorable') else 'no':10}  "
              f"{_images(entry)}{marker}")
    print("* current version")
    return 0
