"""``patchcore serve``: the HTTP service over saved models."""

from __future__ import annotations

import argparse
import math

DEFAULT_MAX_UPLOAD_MB = 20.0


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
    parser.add_argument("--allow-remote-teach-in", action="store_true",
                        help="accept good images (POST /v1/models/{name}/good) from other machines too (default: this machine only)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..serving.server import serve  # the web stack is imported only when serving

    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb must be positive")
    if args.max_queue < 0:
        raise ValueError("--max-queue must be 0 or more")
    serve(args.model, host=args.host, port=args.port, workers=args.workers,
          max_upload_bytes=int(math.floor(args.max_upload_mb * 2**20)), threads=args.threads,
          max_queue=args.max_queue, remote_teaching=args.allow_remote_teach_in)
    return 0
