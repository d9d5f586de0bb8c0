"""``patchcore serve``: the HTTP service over saved models."""

from __future__ import annotations

import argparse
import math

from ..serving.teach_in import DEFAULT_MAX_IMAGES, DEFAULT_MAX_MEGAPIXELS
from ..station.drift import DriftSettings
from ..serving.teach_tokens import DEFAULT_TOKEN_FILE, ensure_token_file
from .options import positive_int

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_DRIFT = DriftSettings()


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "serve", help="serve models over HTTP (JSON API and web page)",
        description="Serve saved models over HTTP: a JSON API (/v1/models, /docs), a web page (/), "
                    "/healthz and Prometheus /metrics. MODEL_DIR is one model directory (named after "
                    "its folder) or a folder of model directories.")
    parser.add_argument("model", metavar="MODEL_DIR", help="a model (saved or exported) directory, or a folder of them")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="server processes; each loads every model (default: 1)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest accepted upload in MiB (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each model's network (default: every core)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a free scoring slot; more are refused at once with 503 (default: 64)")
    parser.add_argument("--history", default=None, metavar="URL",
                        help="record every scored request (source 'service') in this history database: a SQLite file "
                             "path, sqlite:///FILE or postgresql://... (the one 'patchcore watch' writes); the web "
                             "page's History view reviews its verdicts")
    station = parser.add_argument_group("the History view (with --history): review, teach-in queue, drift")
    station.add_argument("--station-folder", action="append", default=[], metavar="DIR",
                         help="a folder whose photos, overlays, masks and evidence crops the History view may show and "
                              "teach from, e.g. watch's OUT_DIR and INBOX (repeatable; default: the folder of a SQLite "
                              "--history file, which is watch's OUT_DIR); files elsewhere are never served")
    station.add_argument("--drift-window", type=positive_int, default=DEFAULT_DRIFT.window, metavar="N",
                         help="drift is measured over each model's last N scored verdicts (default: "
                              f"{DEFAULT_DRIFT.window})")
    station.add_argument("--drift-multiple", type=float, default=DEFAULT_DRIFT.warn_multiple, metavar="X",
                         help="warn when the share of those flagged exceeds X times the false-positive rate the "
                              f"threshold was calibrated at (default: {DEFAULT_DRIFT.warn_multiple:g})")
    teach = parser.add_argument_group("teach-in (POST /v1/models/{name}/good and .../rollback change the model)")
    teach.add_argument("--teach-token-file", default=None, metavar="FILE",
                       help="the teach-in tokens, 'NAME TOKEN' per line, readable by their owner only; created with "
                            f"one token at first start (default: {DEFAULT_TOKEN_FILE})")
    teach.add_argument("--no-teach-in", action="store_true", help="refuse teach-in and rollback altogether")
    teach.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                       help="a web origin besides the service's own whose pages may teach, e.g. the public address of "
                            "a reverse proxy that rewrites Host (repeatable)")
    teach.add_argument("--teach-max-images", type=positive_int, default=DEFAULT_MAX_IMAGES,
                       help=f"images one teach-in request may carry (default: {DEFAULT_MAX_IMAGES})")
    teach.add_argument("--teach-max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                       help=f"decoded megapixels one teach-in request may carry (default: {DEFAULT_MAX_MEGAPIXELS:g})")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..serving.server import serve  # the web stack is imported only when serving

    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb must be positive")
    if args.max_queue < 0:
        raise ValueError("--max-queue must be 0 or more")
    if args.teach_max_megapixels <= 0:
        raise ValueError("--teach-max-megapixels must be positive")
    if not args.drift_multiple > 0 or not math.isfinite(args.drift_multiple):
        raise ValueError("--drift-multiple must be a positive number")
    if args.station_folder and args.history is None:
        raise ValueError("--station-folder needs --history (the History view reads the history database)")
    token_file = None
    if args.no_teach_in:
        print("teach-in: off (--no-teach-in)", flush=True)
    else:
        token_file, new_token = ensure_token_file(args.teach_token_file or DEFAULT_TOKEN_FILE)
        print(f"teach-in: needs a token from {token_file}" + (" (created now, with one token named 'supervisor')"
              if new_token else "") + "; add one for each person with 'patchcore teach-token NAME'", flush=True)
    serve(args.model, host=args.host, port=args.port, workers=args.workers,
          max_upload_bytes=int(math.floor(args.max_upload_mb * 2**20)), threads=args.threads,
          max_queue=args.max_queue, teach_token_file=str(token_file) if token_file else None,
          allowed_origins=args.allow_origin, teach_max_images=args.teach_max_images,
          teach_max_megapixels=args.teach_max_megapixels,
          history_url=args.history, station_folders=args.station_folder, drift_window=args.drift_window,
          drift_multiple=args.drift_multiple)
    return 0
