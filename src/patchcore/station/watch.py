"""The inspection station: score every photo that lands in an inbox, exactly once, and record
each verdict in the history database.

How exactly once holds:

* a photo is taken only once complete (:mod:`.inbox`);
* its key is the station's name, its path and the SHA-256 of its bytes: a key the database holds,
  or that this run queued already, is not scored again (changed bytes are a new key); across
  processes, the database's unique index on the key refuses a second record;
* overlays, masks and evidence crops are written whole (:mod:`~patchcore.engine.atomic_files`)
  before the verdict is queued, so a record never names a missing or truncated file;
* a photo is moved (``--sort``, or aside when unreadable) only after its record is committed; the
  record says where it goes (``stored_path``), so a restart after a crash between the two finishes
  the move instead of scoring the photo again.

A stop (Ctrl-C) drops the photos being scored, commits the verdicts already queued, and leaves
no half-written file or record: the next run scores the dropped photos.
"""

from __future__ import annotations

import errno
from collections import deque
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..engine.atomic_files import atomic_path
from ..engine.digest import file_sha256
from ..engine.evidence import evidence_picture
from ..engine.loading import load_model
from ..engine.overlay import model_heat_scale, overlay_beside_photo, save_png
from ..engine.persistence import manifest_version, model_sha256, read_manifest
from ..engine.prediction import Prediction
from ..errors import ImageLoadError, ModelFormatError
from . import DEFAULT_FILE, REJECTED
from .history import History
from .inbox import Arrival, Inbox
from .schema import EvidenceCrop, Inspection
from .writer import HistoryWriter



@dataclass(frozen=True)
class LoadedModel:
    """A model with what names its version: folder name, manifest version and SHA-256."""

    model: object
    name: str
    version: int
    sha256: str

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int | None = None) -> LoadedModel:
        """The model in ``directory``, its identity read from the same version as its tensors."""
        for _ in range(5):
            before = model_sha256(directory)
            manifest = read_manifest(directory)
            model = load_model(directory, threads=threads)
            if model_sha256(directory) == before:
                return cls(model, Path(directory).resolve().name, manifest_version(manifest), before)
        raise ModelFormatError(f"{directory}: the model changed five times while it was being loaded; try again")


@dataclass
class Result:
    """What happened to one photo, as told to ``on_result``."""

    inspection: Inspection
    #: Seconds from the photo being complete to its verdict being committed.
    latency: float


#: Batches of photos taken at most at once from a backlog: scored in one stream, the next batch is
#: decoded while the network runs on this one (as ``predict`` does); results still come one by one.
TAKE_BATCHES = 4
#: Latencies a run keeps for its figures (a station may run for months).
LATENCIES_KEPT = 100_000


@dataclass
class Summary:
    """A run's figures."""

    scored: int = 0
    unreadable: int = 0
    skipped: int = 0  # recorded before, by this run or an earlier one (same path and bytes)
    seconds: float = 0.0  # from start to stop
    busy_seconds: float = 0.0  # spent hashing, scoring and writing outputs
    #: Seconds from complete to committed, of the last :data:`LATENCIES_KEPT` photos.
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))
    stages: dict[str, float] = field(default_factory=dict)  # network stage -> total seconds
    database_ms: float = 0.0  # commit time per recorded photo

    def latency_ms(self, quantile: float) -> float:
        return 1000.0 * float(np.quantile(self.latencies, quantile)) if self.latencies else 0.0


class Station:
    """Scores the photos landing in ``inbox`` with the model in ``model_dir``.

    ``output``: overlays (``overlays/``), masks, evidence crops (``evidence/``), ``rejected/``
    and, unless ``database`` names another, ``history.db``. ``sort=(ok, ng)``: folders (relative
    to ``output`` unless absolute) to move photos into by verdict once recorded; needs a model
    with a threshold. ``evidence``: crops of that many most anomalous patches per photo.
    ``settle``, ``poll``: see :class:`~.inbox.Inbox`. ``on_result`` hears of each verdict
    committed (from the writer's thread); ``on_notice`` of files noticed in the inbox
    and not yet complete (:class:`~.inbox.Inbox`).
    """

    def __init__(self, model_dir: str | os.PathLike, inbox: str | os.PathLike, output: str | os.PathLike, *,
                 database: str | os.PathLike | None = None, sort: tuple[str, str] | None = None, evidence: int = 0,
                 overlays: bool = True, settle: float = 1.0, stale: float = 30.0, poll: bool = False,
                 station: str | None = None, threads: int | None = None, batch_size: int | None = None,
                 on_result: Callable[[Result], None] | None = None,
                 on_notice: Callable[[Path, str], None] | None = None,
                 on_problem: Callable[[str], None] | None = None) -> None:
        self.output = Path(output).absolute()
        self.inbox_folder = Path(inbox).absolute()
        if not self.inbox_folder.is_dir():
            raise FileNotFoundError(f"{self.inbox_folder}: the inbox folder does not exist")
        if evidence < 0:
            raise ValueError(f"evidence must be 0 or more, got {evidence}")
        self.loaded = LoadedModel.load(model_dir, threads)
        self.model = self.loaded.model
        if batch_size:
            self.model.set_params(batch_size=batch_size)
        self.model.set_params(progress=False)
        if sort is not None and self.model.threshold_ is None:
            raise ValueError(f"{model_dir}: the model has no threshold, so --sort cannot tell ok from ng photos; "
                             "fit it with --calibrate GOOD_IMAGES to set one, or watch without --sort")
        if evidence and self.model.memory_bank_origin_ is None:
            raise ValueError(f"{model_dir}: the model does not record where its memory bank came from (saved by an "
                             "older patchcore); fit it again for --evidence")
        self.output.mkdir(parents=True, exist_ok=True)
        for folder, wanted in (("overlays", overlays), ("masks", self.model.pixel_threshold_ is not None),
                               ("evidence", evidence > 0)):
            if wanted:
                (self.output / folder).mkdir(exist_ok=True)
        self.sort = None if sort is None else tuple(self._folder(name) for name in sort)
        self.evidence = evidence
        self.overlays = overlays
        self.station = station or socket.gethostname()
        self.on_result = on_result
        self.on_problem = on_problem or (lambda message: None)
        self.history = History(database if database is not None else self.output / DEFAULT_FILE)
        self.inbox = Inbox(self.inbox_folder, settle=settle, stale=stale, poll=poll, on_notice=on_notice)
        self.summary = Summary()
        #: Set once the inbox is watched (files landing from then on raise events).
        self.watching = threading.Event()
        self._low, self._high = model_heat_scale(self.model)
        self._done: set[tuple[str, str]] = set()  # keys queued and not yet committed (then the database knows)
        self._names: set[Path] = set()  # output and destination paths claimed and not yet written
        self._names_lock = threading.Lock()
        self._batch_size = int(self.model.settings().batch_size)

    def _folder(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self.output / path

    # -- running -------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, on_watching: Callable[[], None] | None = None) -> Summary:
        """Score photos until ``stop`` is set (or the caller is interrupted); returns the figures.
        ``on_watching`` is called once the inbox is watched. The history is closed afterwards."""
        stop = stop or threading.Event()
        started = time.perf_counter()
        writer = HistoryWriter(self.history, on_problem=self.on_problem)
        try:
            self.inbox.start()
            self.watching.set()
            if on_watching is not None:
                on_watching()
            while not stop.is_set():
                arrivals = self.inbox.take(self._batch_size * TAKE_BATCHES, timeout=0.2)
                if arrivals:
                    t0 = time.perf_counter()
                    self._process(arrivals, writer)
                    self.summary.busy_seconds += time.perf_counter() - t0
        finally:
            self.watching.clear()
            self.inbox.stop()
            writer.close()
            self.history.close()
            self.summary.seconds = time.perf_counter() - started
            self.summary.database_ms = writer.ms_per_inspection
        return self.summary

    def _process(self, arrivals: list[Arrival], writer: HistoryWriter) -> None:
        """Score the new photos of ``arrivals``; finish the moves of those recorded before."""
        jobs: dict[str, tuple[Arrival, str]] = {}
        for arrival in arrivals:
            try:
                sha = file_sha256(arrival.path)
            except FileNotFoundError:
                self.inbox.forget(arrival.path)
                continue
            except OSError as error:  # unreadable now (a share gone away): noticed again on the next rescan
                self.inbox.forget(arrival.path)
                self.on_problem(f"{arrival.path}: cannot read it ({error}); will try again")
                continue
            key = (str(arrival.path), sha)
            if key in self._done:  # queued by this run already; its file was touched since
                self.summary.skipped += 1
                continue
            recorded = self.history.find_watched(self.station, *key)
            if recorded is not None:
                self._done.add(key)
                self.summary.skipped += 1
                self._finish_move(recorded)
                continue
            jobs[str(arrival.path)] = (arrival, sha)
        if not jobs:
            return

        def unreadable(error: ImageLoadError) -> None:
            arrival, sha = jobs[error.source]
            self._queue(writer, arrival, self._inspection(arrival, sha, error=error.problem))

        want_maps = self.overlays or self.model.pixel_threshold_ is not None
        stream = self.model.iter_predict([arrival.path for arrival, _ in jobs.values()], maps=want_maps,
                                         on_error=unreadable, keep_images=self.overlays or self.evidence > 0,
                                         evidence=self.evidence)
        for prediction in stream:
            arrival, sha = jobs[prediction.name]
            inspection = self._inspection(arrival, sha, prediction=prediction)
            self._write_outputs(prediction, inspection)
            for stage, seconds in prediction.timings.items():
                self.summary.stages[stage] = self.summary.stages.get(stage, 0.0) + seconds
            self._queue(writer, arrival, inspection)

    def _inspection(self, arrival: Arrival, sha: str, prediction: Prediction | None = None,
                    error: str | None = None) -> Inspection:
        model = self.model
        if prediction is None:
            verdict, score, timings = "error", None, {}
        else:
            score = float(prediction.score)
            verdict = "unrated" if prediction.is_anomalous is None else ("ng" if prediction.is_anomalous else "ok")
            timings = {stage: round(1000.0 * seconds, 3) for stage, seconds in prediction.timings.items()}
        return Inspection(source="watch", station=self.station, photo_path=str(arrival.path), photo_sha256=sha,
                          model_name=self.loaded.name, model_version=self.loaded.version,
                          model_sha256=self.loaded.sha256, score=score, verdict=verdict, threshold=model.threshold_,
                          pixel_threshold=model.pixel_threshold_, timings=timings, error=error)

    def _queue(self, writer: HistoryWriter, arrival: Arrival, inspection: Inspection) -> None:
        """Plan where the photo goes, and hand the verdict to the writer."""
        destination = self._destination(inspection.verdict)
        if destination is not None:
            inspection.stored_path = str(self._claim(destination / arrival.path.name))
        self._done.add((inspection.photo_path, inspection.photo_sha256))
        claimed = [Path(path) for path in (inspection.overlay_path, inspection.mask_path, inspection.stored_path,
                                           *(crop.picture_path for crop in inspection.evidence)) if path]
        writer.put(inspection, lambda recorded: self._committed(recorded, arrival, claimed))

    def _destination(self, verdict: str) -> Path | None:
        if verdict == "error":
            return self.output / REJECTED
        if self.sort is not None and verdict in ("ok", "ng"):
            return self.sort[0] if verdict == "ok" else self.sort[1]
        return None

    def _committed(self, inspection: Inspection, arrival: Arrival, claimed: list[Path]) -> None:
        """After the commit (the writer's thread): move the photo, forget what the database now
        knows, then tell."""
        latency = time.monotonic() - arrival.complete
        self._finish_move(inspection)
        self._done.discard((inspection.photo_path, inspection.photo_sha256))
        with self._names_lock:  # written or moved now: on disk, where _claim sees them
            self._names.difference_update(claimed)
        if inspection.verdict == "error":
            self.summary.unreadable += 1
        else:
            self.summary.scored += 1
        self.summary.latencies.append(latency)
        if self.on_result is not None:
            self.on_result(Result(inspection, latency))

    # -- files -----------------------------------------------------------------------------------

    def _finish_move(self, inspection: Inspection) -> None:
        """Move the photo to where its record says it goes, when it still lies where it was taken."""
        if inspection.stored_path is None:
            return
        source, target = Path(inspection.photo_path), Path(inspection.stored_path)
        if not source.is_file() or file_sha256(source) != inspection.photo_sha256:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            if target.is_file() and file_sha256(target) == inspection.photo_sha256:
                source.unlink()  # moved before, by a run that stopped before removing the original
                self.inbox.forget(source)
                return
            target = self._claim(target)
            self.history.set_stored_path(inspection.id, str(target))
            inspection.stored_path = str(target)
        _move(source, target)
        self.inbox.forget(source)

    def _claim(self, wanted: Path) -> Path:
        """``wanted``, or ``name-2.ext``, ``name-3.ext``, ... : a path neither on disk nor claimed."""
        with self._names_lock:
            candidate, count = wanted, 1
            while candidate in self._names or candidate.exists():
                count += 1
                candidate = wanted.with_name(f"{wanted.stem}-{count}{wanted.suffix}")
            self._names.add(candidate)
            return candidate

    def _write_outputs(self, prediction: Prediction, inspection: Inspection) -> None:
        """Overlay, mask and evidence crops, as ``patchcore predict`` writes them, named in ``inspection``."""
        name = Path(prediction.name).name + ".png"
        if self.overlays and prediction.anomaly_map is not None and prediction.image is not None:
            path = self._claim(self.output / "overlays" / name)
            save_png(overlay_beside_photo(prediction.image, prediction.anomaly_map, self._low, self._high), path)
            inspection.overlay_path = str(path)
        if prediction.mask is not None:
            path = self._claim(self.output / "masks" / name)
            save_png(Image.fromarray(prediction.mask.astype(np.uint8) * 255), path)
            inspection.mask_path = str(path)
        for rank, item in enumerate(prediction.evidence, 1):
            picture = None
            if prediction.image is not None:
                picture = self._claim(self.output / "evidence" / f"{name[:-4]}-{rank}.png")
                save_png(evidence_picture(prediction.image, item), picture)
            inspection.evidence.append(EvidenceCrop(
                rank=rank, picture_path=None if picture is None else str(picture), distance=float(item.distance),
                box=list(item.box), training_image=str(item.training_image),
                training_box=None if item.training_box is None else list(item.training_box)))
        prediction.anomaly_map = prediction.mask = prediction.image = None


def _move(source: Path, target: Path) -> None:
    """Move a file; across file systems, copy it whole under a temporary name, then remove the source."""
    try:
        os.rename(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:  # another file system
            raise
    with atomic_path(target, durable=True) as temporary:
        shutil.copy2(source, temporary)
    source.unlink()
