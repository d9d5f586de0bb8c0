"""Running the service with uvicorn, in one process or several."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

from .app import DEFAULT_MAX_UPLOAD_BYTES, create_app
from .metrics import MULTIPROCESS_DIR
from .models import discover_models, load_models

_ENV_CONFIG = "PATCHCORE_SERVICE_CONFIG"


def app_from_environment():
    """App factory for uvicorn's worker processes: the configuration travels in an environment variable."""
    config = json.loads(os.environ[_ENV_CONFIG])
    return create_app(config.pop("model_dirs"), **config)


def serve(
    model_dirs: str | os.PathLike | Mapping[str, str | os.PathLike],
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Run the service with uvicorn (blocks). ``model_dirs``: a model directory, a folder of them,
    or ``{name: directory}``. Each of ``workers`` processes loads every model; their metrics are
    summed (:mod:`.metrics`)."""
    import uvicorn

    if isinstance(model_dirs, (str, os.PathLike)):
        model_dirs = discover_models(model_dirs)
    model_dirs = {name: str(path) for name, path in model_dirs.items()}
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    settings = dict(host=host, port=port, log_level=log_level, server_header=False,
                    timeout_keep_alive=5, limit_concurrency=max(256, 4 * options.get("max_queue", 64)))
    if workers == 1:
        uvicorn.run(create_app(model_dirs, max_upload_bytes, **options), **settings)
    else:
        load_models(model_dirs)  # fail here, once, with a clear message, rather than in every worker
        if options.get("history_url") is not None:  # likewise the history database (created and migrated here)
            from ..station.history import History

            History(options["history_url"]).close()
            options["history_url"] = str(options["history_url"])
        os.environ[_ENV_CONFIG] = json.dumps({"model_dirs": model_dirs, "max_upload_bytes": max_upload_bytes, **options})
        # Metrics summed over the workers (prometheus_client's multiprocess mode), in a folder of this run's own.
        metrics_dir = tempfile.mkdtemp(prefix="patchcore-metrics-")
        os.environ[MULTIPROCESS_DIR] = metrics_dir
        try:
            uvicorn.run("patchcore.serving.server:app_from_environment", factory=True, workers=workers, **settings)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
