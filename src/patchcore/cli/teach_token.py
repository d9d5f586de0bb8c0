"""``patchcore teach-token``: a named token that lets a person teach models through the service."""

from __future__ import annotations

import argparse

from ..serving.teach_tokens import DEFAULT_TOKEN_FILE, add_token


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "teach-token", help="create a named teach-in token for the service",
        description="Add a new random teach-in token for NAME to the service's token file (created readable by its "
                    "owner only) and print it once. The service reads the file on every teach-in: no restart is "
                    "needed, and deleting a line revokes that token. Model histories record NAME as who taught.")
    parser.add_argument("name", metavar="NAME", help="who the token belongs to (letters, digits, . _ - @)")
    parser.add_argument("--file", default=None, metavar="FILE", help=f"the token file (default: {DEFAULT_TOKEN_FILE})")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    path = args.file or DEFAULT_TOKEN_FILE
    token = add_token(path, args.name)
    print(f"teach-in token for {args.name!r} (added to {path}; shown once):\n{token}")
    return 0
