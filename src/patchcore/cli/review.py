"""``patchcore review export``: reviewed photos of a history database as an evaluation layout."""

from __future__ import annotations

import argparse
import sys


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "review", help="use the reviews of a history database (export them for 'patchcore evaluate')",
        description="Work with the reviews people gave a station's verdicts (the web page's History view).")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export", help="copy reviewed photos into OUT/good/ (false alarms) and OUT/defect/ (confirmed defects)",
        description="Copy every reviewed photo, by its latest review, into a plain evaluation layout: OUT/good/ for "
                    "false alarms, OUT/defect/ for confirmed defects (copies, not moves; only photos that still hold "
                    "the bytes scored), with OUT/reviews.csv listing them. Then 'patchcore evaluate OUT --train "
                    "GOOD_IMAGES -o REPORT' measures a model on the line's own confirmed cases.")
    export.add_argument("database", metavar="DB", help="the history database: a SQLite file path, sqlite:///FILE or "
                                                       "postgresql://...")
    export.add_argument("-o", "--output", required=True, metavar="OUT", help="a new (or empty) folder")
    export.add_argument("--model", default=None, metavar="NAME", help="only the verdicts of this model")
    export.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """0 when photos were exported, 1 when there was none to export."""
    from ..station.history import History
    from ..station.review_export import export_reviewed

    with History(args.database) as history:
        summary = export_reviewed(history, args.output, args.model)
    for inspection, why in summary.skipped:
        print(f"warning: inspection {inspection} left out: {why}", file=sys.stderr)
    good, defect = summary.written["good"], summary.written["defect"]
    print(f"wrote {good} false alarms to {args.output}/good/ and {defect} confirmed defects to {args.output}/defect/ "
          f"({len(summary.skipped)} left out); list: {args.output}/reviews.csv")
    if not good + defect:
        print("warning: no reviewed photo to export", file=sys.stderr)
        return 1
    return 0
