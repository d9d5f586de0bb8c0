"""``patchcore watch``: an inspection station; score every photo that lands in a folder, exactly once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..station import DEFAULT_FILE, REJECTED
from .options import add_runtime_options, names, positive_int, use_device


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "watch", help="score every photo that lands in a folder, and record each verdict",
        description="An inspection station: score every photo that lands in INBOX exactly once, as soon as it is "
                    "complete (renamed into the folder, or unchanged for --settle seconds), write its overlay, record "
                    "the verdict in the history database, and optionally sort the photo by verdict. Photos already "
                    "there are scored first; a restart never scores the same bytes under the same path twice. "
                    "Unreadable photos are recorded with their error and moved to OUT/rejected. Ctrl-C stops.")
    parser.add_argument("model", metavar="MODEL_DIR", help="folder written by 'patchcore fit' or 'patchcore export'")
    parser.add_argument("inbox", metavar="INBOX", help="the folder photos land in")
    parser.add_argument("-o", "--output", default=None, metavar="OUT_DIR",
                        help=f"folder for overlays/, {REJECTED}/, sorted photos and {DEFAULT_FILE} "
                             "(default: INBOX-results beside INBOX)")
    parser.add_argument("--db", default=None, metavar="URL",
                        help=f"history database: a SQLite file path, sqlite:///FILE, or postgresql://USER@HOST/DB for a "
                             f"station shared by several lines (default: OUT_DIR/{DEFAULT_FILE})")
    parser.add_argument("--sort", type=names, default=None, metavar="OK,NG",
                        help="move each photo, once its verdict is recorded, into folder OK or NG (relative to OUT_DIR "
                             "unless absolute), e.g. --sort ok,ng; needs a model with a threshold")
    parser.add_argument("--evidence", type=int, default=0, metavar="N",
                        help="for the N most anomalous patches of each photo, a crop beside the nearest normal patch of "
                             "the training images, in OUT_DIR/evidence/ (default: 0, none)")
    parser.add_argument("--no-overlays", action="store_true", help="write no heat-map overlays")
    parser.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                        help="a photo not renamed into INBOX is complete once unchanged this long (and, for PNG and "
                             "JPEG, ending as a whole file does) (default: 1)")
    parser.add_argument("--poll", action="store_true",
                        help="look for new photos by polling instead of file-system events (network shares)")
    parser.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                        help="with --poll: seconds between looks (default: 1)")
    parser.add_argument("--station", default=None, metavar="NAME",
                        help="name of this station or line in the history (default: the host name)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="photos scored together at most when several are waiting (default: as fitted)")
    add_runtime_options(parser)
    parser.set_defaults(handler=run)


def _sort_folders(value: list[str] | None) -> tuple[str, str] | None:
    if value is None:
        return None
    if len(value) != 2 or value[0] == value[1]:
        raise ValueError(f"--sort takes two different folders, OK,NG (e.g. --sort ok,ng), got {','.join(value)!r}")
    return value[0], value[1]


def _print_result(result) -> None:
    inspection = result.inspection
    if inspection.verdict == "error":
        where = f" (moved to {inspection.stored_path})" if inspection.stored_path else ""
        print(f"warning: unreadable {inspection.photo_path}: {inspection.error}{where}", file=sys.stderr, flush=True)
        return
    verdict = {"ok": "ok", "ng": "ANOMALOUS", "unrated": ""}[inspection.verdict]
    moved = f"  -> {inspection.stored_path}" if inspection.stored_path else ""
    print(f"{inspection.score:10.4f}  {verdict:9s}  {inspection.photo_path}{moved}  ({1000 * result.latency:.0f} ms)",
          flush=True)


def summary_line(summary) -> str:
    """The figures of a run, as ``patchcore predict`` prints its own."""
    done = summary.scored + summary.unreadable
    per_photo = 1000.0 * summary.busy_seconds / max(1, done)
    rate = done / summary.busy_seconds if summary.busy_seconds else 0.0
    stages = {stage: 1000.0 * summary.stages.get(stage, 0.0) / max(1, summary.scored) for stage in ("backbone", "search", "map")}
    return (f"watched {summary.seconds:.1f} s: {summary.scored} photos scored, {summary.unreadable} unreadable, "
            f"{summary.skipped} recorded before; {per_photo:.0f} ms per photo with reading and writing "
            f"({rate:.2f} photos/s while busy; network {stages['backbone']:.0f}, search {stages['search']:.0f}, "
            f"map {stages['map']:.0f} ms); latency from complete to recorded: median {summary.latency_ms(0.5):.0f} ms, "
            f"95th percentile {summary.latency_ms(0.95):.0f} ms; database {summary.database_ms:.1f} ms per photo "
            "(in its own thread)")


def run(args: argparse.Namespace) -> int:
    if args.evidence < 0:
        raise ValueError("--evidence must be 0 or more")
    if args.settle <= 0 or args.poll_interval <= 0:
        raise ValueError("--settle and --poll-interval must be positive")
    from ..station.watch import Station  # the database stack is imported only when watching

    inbox = Path(args.inbox)
    output = Path(args.output) if args.output else inbox.absolute().parent / f"{inbox.absolute().name}-results"
    station = Station(args.model, inbox, output, database=args.db, sort=_sort_folders(args.sort), evidence=args.evidence,
                      overlays=not args.no_overlays, settle=args.settle, stale=max(30.0, 10 * args.settle),
                      poll=args.poll, station=args.station, threads=args.threads, batch_size=args.batch_size,
                      on_result=_print_result, on_problem=lambda message: print(f"warning: {message}", file=sys.stderr))
    use_device(station.model, args.device)
    loaded = station.loaded
    threshold = ("no threshold" if station.model.threshold_ is None else
                 f"threshold {station.model.threshold_:.4f}, {station.model.threshold_kind()}")

    def watching() -> None:  # once photos landing raise events: from then on, a rename is taken at once
        print(f"watching {station.inbox_folder} with model {loaded.name} version {loaded.version} ({threshold}); "
              f"verdicts to {station.history.name}; Ctrl-C stops", file=sys.stderr, flush=True)

    try:
        station.run(on_watching=watching)
    finally:  # also when stopped (Ctrl-C, SIGTERM): the run's figures
        print(summary_line(station.summary), flush=True)
    return 0
