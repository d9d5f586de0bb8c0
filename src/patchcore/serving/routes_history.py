"""The History view's API: the station's verdicts, reviews, the teach-in queue, and drift
(``/v1/history/...``; on with ``serve --history``, else every route answers 404).

- **Listing and files.** Inspections with filters (model, verdict, score range, time range,
  reviewed or not; paged), one with its overlay, mask, photo and evidence crops. Files are served
  only as the records name them (a client names an inspection and a kind, never a path), and only
  when the file, symbolic links resolved, lies under one of the station's folders (``serve
  --station-folder``; default: the SQLite database's folder, which is ``watch``'s output folder):
  a record naming ``/etc/passwd`` or ``../..`` gets 403, and only image files are served.
- **Reviews** change no model, so they need no credential: an operator types a name, recorded as
  given (``who_verified`` false); a request carrying a teach-in token (``Authorization: Bearer``)
  is recorded under the token's name instead (``who_verified`` true). Requests from web pages of
  other sites are refused, as for teach-in.
- **The teach-in queue**: inspections whose latest review says false alarm, not yet taught.
  Applying it is teach-in (:func:`.teach_in.teach`): the same credential checks
  (:func:`.teach_in.authorise`), the same bounds (``--teach-max-images``, ``--teach-max-megapixels``
  per apply; the rest stay queued), one new model version under the model directory's lock, with
  the supervisor's name in the model's history, undone by rollback as any teach-in. The photos are
  read from their stored paths and must still hold the bytes reviewed (SHA-256). Entries are
  claimed in the database first, so two supervisors applying at once never teach a photo twice.
- **Drift** (:mod:`patchcore.station.drift`): per served model, the last N scored verdicts against
  the calibrated false-positive rate; also refreshed every :data:`DRIFT_REFRESH_SECONDS` into the
  Prometheus gauges.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import AwareDatetime, BaseModel, BeforeValidator, Field, StringConstraints

from ..engine.digest import file_sha256
from ..station.drift import Drift, DriftSettings, drift_of, expected_flagged_share
from ..station.history import History, HistoryError
from ..station.schema import REVIEW_VERDICTS, Inspection, Review
from .guard import ServiceError
from .metrics import Metrics
from .models import ServedModel
from .routes_dependencies import Models, Runner, ServiceMetrics, error_responses, find_model
from .routes_teach_in import Policy
from .teach_in import authorise, check_origin, teach

logger = logging.getLogger("patchcore.service")

#: Seconds between refreshes of the drift gauges from the history database.
DRIFT_REFRESH_SECONDS = 15.0
#: Files the History view serves, by suffix: images only, whatever a record names.
IMAGE_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
                     ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp"}
#: Queue entries listed at most.
MAX_QUEUE_LISTED = 200
_LARGEST_ID = 2**31 - 1


@dataclass(frozen=True)
class StationView:
    """What the history routes read: the database, the folders whose files may be served, and
    how drift is watched."""

    history: History
    folders: tuple[Path, ...]
    drift: DriftSettings

    @classmethod
    def open(cls, history: History, folders: Sequence[str | os.PathLike], drift: DriftSettings) -> StationView:
        """``folders`` (default: the SQLite database's folder), resolved now."""
        chosen = [Path(folder) for folder in folders]
        if not chosen and history.url.get_backend_name() == "sqlite" and history.url.database not in (None, ":memory:"):
            chosen = [Path(history.url.database).parent]
        return cls(history, tuple(folder.expanduser().resolve() for folder in chosen), drift)

    def file(self, recorded: str | None, what: str) -> Path:
        """The file a record names, when it lies under one of the station's folders: 404 when
        none is recorded or it is gone, 403 when it lies elsewhere or is not an image."""
        if not recorded:
            raise ServiceError(404, f"no {what} was recorded for this inspection")
        path = Path(recorded)
        if not path.is_absolute():  # the service records an upload's own name: no file of ours
            raise ServiceError(404, f"the {what} was not stored (recorded as {path.name!r}, an upload's name)")
        real = path.resolve()
        if not any(real.is_relative_to(folder) for folder in self.folders):
            raise ServiceError(403, f"the {what} lies outside the station's folders; start the service with "
                                    "--station-folder naming the folder it lies in to show it")
        if real.suffix.lower() not in IMAGE_MEDIA_TYPES:
            raise ServiceError(403, f"the {what} is not an image file")
        if not real.is_file():
            raise ServiceError(404, f"the {what} is no longer there ({path.name})")
        return real

    def photo(self, inspection: Inspection) -> Path:
        """The photo of an inspection, where it lies now, still holding the bytes reviewed."""
        path = self.file(inspection.stored_path or inspection.photo_path, "photo")
        if file_sha256(path) != inspection.photo_sha256:
            raise ServiceError(404, f"the photo {path.name} was replaced since it was scored (other bytes)")
        return path


async def get_station(request: Request) -> StationView | None:
    return getattr(request.app.state, "station", None)


OptionalStation = Annotated[StationView | None, Depends(get_station)]


def need(station: StationView | None) -> StationView:
    """The station's history; 404 when the service runs without one (after the request's own
    parameters were checked, so that a bad request is still told what is wrong with it)."""
    if station is None:
        raise ServiceError(404, "no history database: start the service with --history (the database "
                                "'patchcore watch' writes) for the History view")
    return station


router = APIRouter(tags=["history"])

_NO_HISTORY = {404: "no history database (start the service with --history), or no such inspection or file"}
_AUTH_ERRORS = {401: "no teach-in token, or not one of the service's (send Authorization: Bearer TOKEN)",
                403: "teach-in is off (no token file), or the request comes from a web page of another site"}

InspectionId = Annotated[int, PathParam(ge=1, le=_LARGEST_ID, description="the inspection's id")]


# -- JSON ------------------------------------------------------------------------------------------

def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def review_json(review: Review) -> dict[str, Any]:
    return {"id": review.id, "verdict": review.verdict, "who": review.who, "who_verified": bool(review.who_verified),
            "at": _time(review.at), "note": review.note, "taught_by": review.taught_by,
            "taught_at": _time(review.taught_at), "taught_version": review.taught_version}


def _files(inspection: Inspection) -> dict[str, str | None]:
    base = f"/v1/history/inspections/{inspection.id}/files"
    stored = inspection.stored_path or (inspection.photo_path if Path(inspection.photo_path).is_absolute() else None)
    return {"photo": f"{base}/photo" if stored else None,
            "overlay": f"{base}/overlay" if inspection.overlay_path else None,
            "mask": f"{base}/mask" if inspection.mask_path else None}


def inspection_json(inspection: Inspection, reviews: bool = True) -> dict[str, Any]:
    """An inspection as the API shows it: its verdict, where its files are served, its evidence and reviews."""
    base = f"/v1/history/inspections/{inspection.id}"
    found = {
        "id": inspection.id, "at": _time(inspection.at), "source": inspection.source, "station": inspection.station,
        "photo": Path(inspection.photo_path).name, "photo_path": inspection.photo_path,
        "photo_sha256": inspection.photo_sha256, "stored_path": inspection.stored_path,
        "model": inspection.model_name, "model_version": inspection.model_version, "score": inspection.score,
        "verdict": inspection.verdict, "threshold": inspection.threshold, "error": inspection.error,
        "files": _files(inspection),
        "evidence": [{"rank": crop.rank, "distance": crop.distance, "box": crop.box,
                      "training_image": crop.training_image, "training_box": crop.training_box,
                      "url": f"{base}/evidence/{crop.rank}" if crop.picture_path else None}
                     for crop in inspection.evidence],
    }
    if reviews:
        ordered = sorted(inspection.reviews, key=lambda review: review.id)
        found["reviews"] = [review_json(review) for review in ordered]
        found["review"] = ordered[-1].verdict if ordered else None
    return found


# -- listing, one inspection, its files --------------------------------------------------------------

def _iso_time(value: Any) -> Any:
    """Only ISO 8601 times (pydantic alone would take a number as a Unix time)."""
    if isinstance(value, str) and not re.match(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}", value):
        raise ValueError("give an ISO 8601 time with its zone, e.g. 2026-12-01T08:00:00Z")
    return value


Score = Annotated[float | None, Query(allow_inf_nan=False)]
Verdict = Literal["ok", "ng", "unrated", "error"]  # station.schema.VERDICTS
Since = Annotated[AwareDatetime | None, BeforeValidator(_iso_time),
                  Query(description="from this time on: ISO 8601 with its zone, e.g. 2026-12-01T08:00:00Z")]
Until = Annotated[AwareDatetime | None, BeforeValidator(_iso_time),
                  Query(description="before this time: ISO 8601 with its zone")]


@router.get("/v1/history", summary="Whether there is a history database, and what it holds")
def history_summary(station: OptionalStation) -> dict:
    """`enabled`: whether the service reads a history database (`serve --history`; without one
    the other /v1/history routes answer 404); with one, the models it holds verdicts of and how
    many verdicts of each kind."""
    if station is None:
        return {"enabled": False, "models": [], "verdicts": {}}
    return {"enabled": True, "database": station.history.name, "models": station.history.model_names(),
            "verdicts": station.history.verdict_counts(), "review_verdicts": list(REVIEW_VERDICTS)}


@router.get("/v1/history/inspections", summary="List inspections",
            responses=error_responses({**_NO_HISTORY, 422: "invalid parameter"}))
def list_inspections(
    station: OptionalStation,
    model: Annotated[str | None, Query(max_length=255, description="the model's name")] = None,
    verdict: Annotated[Verdict | None, Query(description="ok, ng, unrated or error")] = None,
    min_score: Score = None,
    max_score: Score = None,
    since: Since = None,
    until: Until = None,
    reviewed: Annotated[bool | None, Query(description="only those with (true) or without (false) a review")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=_LARGEST_ID)] = 0,
) -> dict:
    """Inspections matching every filter given, newest first, with `total` for paging; each with
    its verdict, reviews, and the URLs of its files."""
    filters = {"model_name": model, "verdict": verdict, "since": since, "until": until, "reviewed": reviewed,
               "min_score": min_score, "max_score": max_score}
    history = need(station).history
    rows = history.inspections(**filters, limit=limit, offset=offset)
    return {"total": history.count_inspections(**filters), "limit": limit, "offset": offset,
            "inspections": [inspection_json(row) for row in rows]}


def _inspection(station: StationView | None, inspection_id: int) -> Inspection:
    found = need(station).history.inspection(inspection_id)
    if found is None:
        raise ServiceError(404, f"no inspection {inspection_id}")
    return found


@router.get("/v1/history/inspections/{inspection_id}", summary="One inspection",
            responses=error_responses({**_NO_HISTORY, 422: "invalid parameter"}))
def one_inspection(inspection_id: InspectionId, station: OptionalStation) -> dict:
    """One inspection with its evidence, reviews and the URLs of its files."""
    return inspection_json(_inspection(station, inspection_id))


_FILE_RESPONSES = {200: {"description": "the image file",
                         "content": {media: {} for media in sorted(set(IMAGE_MEDIA_TYPES.values()))}},
                   **error_responses({**_NO_HISTORY, 403: "the recorded file lies outside the station's folders, "
                                                          "or is not an image", 422: "invalid parameter"})}


def _file_response(path: Path) -> FileResponse:
    return FileResponse(path, media_type=IMAGE_MEDIA_TYPES[path.suffix.lower()],
                        headers={"x-content-type-options": "nosniff", "cache-control": "no-cache"})


@router.get("/v1/history/inspections/{inspection_id}/files/{kind}", summary="A file of an inspection",
            response_class=FileResponse, responses=_FILE_RESPONSES)
def inspection_file(inspection_id: InspectionId, kind: Literal["photo", "overlay", "mask"],
                    station: OptionalStation) -> FileResponse:
    """The photo (where it lies now, if it still holds the bytes scored), its heat-map overlay, or
    its defect mask, as recorded; only files under the station's folders are served."""
    inspection = _inspection(station, inspection_id)
    view = need(station)
    if kind == "photo":
        return _file_response(view.photo(inspection))
    return _file_response(view.file(inspection.overlay_path if kind == "overlay" else inspection.mask_path, kind))


@router.get("/v1/history/inspections/{inspection_id}/evidence/{rank}", summary="An evidence crop of an inspection",
            response_class=FileResponse, responses=_FILE_RESPONSES)
def evidence_file(inspection_id: InspectionId, rank: Annotated[int, PathParam(ge=1, le=1000)],
                  station: OptionalStation) -> FileResponse:
    """The crop of the inspection's `rank`-th most anomalous patch beside its nearest normal patch."""
    inspection = _inspection(station, inspection_id)
    crop = next((crop for crop in inspection.evidence if crop.rank == rank), None)
    return _file_response(need(station).file(None if crop is None else crop.picture_path, f"evidence crop {rank}"))


# -- reviews ---------------------------------------------------------------------------------------

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]


class ReviewRequest(BaseModel):
    """An operator's judgement of an inspection."""

    verdict: Literal["false_alarm", "confirmed_defect"]
    who: Name | None = Field(None, description="the reviewer's name, recorded as given; with a teach-in token "
                                               "(Authorization: Bearer) the token's name is recorded instead")
    note: Annotated[str, StringConstraints(max_length=2000)] | None = None


@router.post("/v1/history/inspections/{inspection_id}/reviews", summary="Review an inspection", status_code=201,
             responses=error_responses({**_NO_HISTORY,
                                        401: "no reviewer named ('who') and no teach-in token, or a token that is not "
                                             "one of the service's",
                                        403: "a token was sent but teach-in is off, or the request comes from a web "
                                             "page of another site",
                                        400: "the body is not JSON",
                                        409: "the photo could not be read: there is no verdict to review",
                                        422: "invalid body"}))
def add_review(inspection_id: InspectionId, body: ReviewRequest, request: Request, station: OptionalStation,
               policy: Policy) -> dict:
    """Mark an inspection a false alarm or a confirmed defect. Changes no model: false alarms wait
    in the teach-in queue until a supervisor applies it. The reviewer is `who` as given, or, when
    the request carries a teach-in token, the token's name."""
    need(station)
    if request.headers.get("authorization"):
        who, verified = authorise(request.headers, policy), True
    else:
        check_origin(request.headers, policy.allowed_origins)
        if body.who is None:  # an anonymous review: no one to record
            raise ServiceError(401, "say who reviews: the field 'who' (your name), or a teach-in token "
                                    "(Authorization: Bearer TOKEN)",
                               {"WWW-Authenticate": 'Bearer realm="patchcore teach-in"'})
        who, verified = body.who, False
    inspection = _inspection(station, inspection_id)
    if inspection.verdict == "error":
        raise ServiceError(409, f"inspection {inspection_id}: the photo could not be read; "
                                "there is no verdict to review")
    history = need(station).history
    try:
        review = history.add_review(inspection_id, body.verdict, who, note=body.note, verified=verified)
    except HistoryError as error:
        raise ServiceError(404, str(error)) from None
    return {"inspection": inspection_json(_inspection(station, inspection_id)), "review": review_json(review)}


# -- the teach-in queue -----------------------------------------------------------------------------

def _queue_entry(view: StationView, review: Review) -> dict[str, Any]:
    """A queued false alarm, and whether its photo is where the record says (its bytes are
    checked when it is taught)."""
    try:
        view.file(review.inspection.stored_path or review.inspection.photo_path, "photo")
        problem = None
    except ServiceError as error:
        problem = error.message
    return {"review": review_json(review), "inspection": inspection_json(review.inspection, reviews=False),
            "available": problem is None, "problem": problem}


@router.get("/v1/history/queue", summary="The teach-in queue",
            responses=error_responses({**_NO_HISTORY, 422: "invalid parameter"}))
def teach_in_queue(station: OptionalStation,
                   model: Annotated[str | None, Query(max_length=255, description="the model's name")] = None) -> dict:
    """The false alarms waiting to be taught in, oldest first: each inspection whose latest review
    says false alarm and that was not taught yet, and whether its photo is still there."""
    view = need(station)
    reviews = view.history.teach_in_queue(model, limit=MAX_QUEUE_LISTED)
    return {"model": model, "entries": [_queue_entry(view, review) for review in reviews]}


@dataclass
class _Batch:
    """What one apply teaches: the queue's oldest readable photos that fit one teach-in request."""

    reviews: list[Review]
    files: list[tuple[bytes, str]]
    unavailable: list[dict[str, Any]]


def _read_photo(view: StationView, inspection: Inspection) -> tuple[bytes, int]:
    """The photo's bytes, still those scored, and its pixels (from its header)."""
    data = view.file(inspection.stored_path or inspection.photo_path, "photo").read_bytes()
    if hashlib.sha256(data).hexdigest() != inspection.photo_sha256:
        raise ServiceError(404, "the photo was replaced since it was scored (other bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return data, image.width * image.height
    except Exception as error:  # noqa: BLE001 - said in the answer; the entry stays queued
        raise ServiceError(422, f"the photo cannot be read: {error}") from None


def _batch(view: StationView, reviews: list[Review], max_images: int, max_megapixels: float) -> _Batch:
    batch = _Batch([], [], [])
    pixels, limit = 0, max_megapixels * 1e6
    for review in reviews:
        if len(batch.reviews) >= max_images:
            break
        try:
            data, size = _read_photo(view, review.inspection)
            if size > limit:
                raise ServiceError(413, f"the photo holds {size / 1e6:.1f} megapixels, more than one teach-in may "
                                        f"({max_megapixels:g})")
        except (ServiceError, OSError) as error:
            batch.unavailable.append({"inspection": review.inspection_id,
                                      "problem": getattr(error, "message", None) or str(error)})
            continue
        if pixels + size > limit:
            break  # taught by the next apply
        pixels += size
        batch.reviews.append(review)
        batch.files.append((data, Path(review.inspection.photo_path).name))
    return batch


@router.post("/v1/history/queue/apply", summary="Teach the queued false alarms in",
             responses=error_responses({**_NO_HISTORY, **_AUTH_ERRORS,
                                        409: "nothing to teach (the queue is empty, or no queued photo can be read), "
                                             "or the memory bank is full",
                                        413: "a photo is too large", 422: "invalid parameter or unusable photo",
                                        503: "overloaded; retry"}))
async def apply_queue(request: Request, models: Models, runner: Runner, policy: Policy, station: OptionalStation,
                      model: Annotated[str, Query(max_length=255, description="the served model to teach")]) -> dict:
    """Teach the photos of the queued false alarms of `model` as good, in one new model version
    (teach-in: needs `Authorization: Bearer TOKEN`; recorded with the token's name; bounded per
    apply by the service's teach-in limits, the rest staying queued; undone by rollback). The
    entries taught are marked with the version."""
    who = authorise(request.headers, policy)
    view = need(station)
    find_model(models, model)
    reviews = await run_in_threadpool(view.history.teach_in_queue, model)
    if not reviews:
        raise ServiceError(409, f"the teach-in queue of model {model!r} is empty")
    batch = await run_in_threadpool(_batch, view, reviews, policy.max_images, policy.max_megapixels)
    if not batch.reviews:
        raise ServiceError(409, f"none of the queued photos of model {model!r} can be taught: " + "; ".join(
            f"inspection {item['inspection']}: {item['problem']}" for item in batch.unavailable))
    claimed = set(await run_in_threadpool(view.history.claim_teach_in, [review.id for review in batch.reviews], who))
    chosen = [(review, file) for review, file in zip(batch.reviews, batch.files) if review.id in claimed]
    if not chosen:
        raise ServiceError(409, "another apply is teaching these photos now; look at the queue again")
    ids = [review.id for review, _ in chosen]
    try:
        taught = await runner.run(teach, models, model, [file for _, file in chosen], who, runner)
    except BaseException:
        await run_in_threadpool(view.history.release_teach_in, ids)
        raise
    await run_in_threadpool(view.history.finish_teach_in, ids, taught["version"])
    logger.info("teach-in queue of %r applied by %s: %d photos, version %d", model, who, len(ids), taught["version"])
    return {**taught, "who": who, "taught_inspections": [review.inspection_id for review, _ in chosen],
            "left_in_queue": len(reviews) - len(ids), "unavailable": batch.unavailable}


# -- drift ----------------------------------------------------------------------------------------

def model_drift(view: StationView, served: ServedModel) -> tuple[dict[str, Any], Drift]:
    """The drift of one served model from its last scored verdicts in the history: as JSON, and as figures."""
    scores = view.history.recent_scores(served.name, view.drift.window)
    figures = drift_of(scores, served.threshold, expected_flagged_share(served.model.threshold_source_), view.drift)
    return {"model": served.name, "version": served.version, **figures.as_dict()}, figures


def refresh_drift(view: StationView, models: Mapping[str, ServedModel], metrics: Metrics) -> dict[str, dict[str, Any]]:
    """Every served model's drift, written to the Prometheus gauges too."""
    found = {}
    for name in list(models):
        figures, drift = model_drift(view, models[name])
        metrics.set_drift(name, drift)
        found[name] = figures
    return found


@router.get("/v1/history/drift", summary="Drift of each served model", responses=error_responses(_NO_HISTORY))
def drift(station: OptionalStation, models: Models, metrics: ServiceMetrics) -> dict:
    """Per served model, over its last N scored verdicts in the history: the share flagged against
    the share its calibration expected (the threshold's false-positive rate), score quantiles, and
    a warning when the flagged share exceeds the set multiple of the expected one."""
    view = need(station)
    return {"window": view.drift.window, "warn_multiple": view.drift.warn_multiple,
            "models": refresh_drift(view, models, metrics)}


class DriftRefresher:
    """Refreshes the drift gauges every ``seconds`` in a daemon thread, so that Prometheus sees
    drift without anyone opening the page (a scrape reads the gauges and never the database)."""

    def __init__(self, view: StationView, models: Mapping[str, ServedModel], metrics: Metrics,
                 seconds: float = DRIFT_REFRESH_SECONDS) -> None:
        self._stop = threading.Event()
        self._arguments = (view, models, metrics)
        self._seconds = seconds
        self._thread = threading.Thread(target=self._run, name="patchcore-drift", daemon=True)

    def start(self) -> DriftRefresher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                refresh_drift(*self._arguments)
            except Exception as error:  # noqa: BLE001 - a database away for a while: the next round tries again
                logger.warning("drift: cannot read the history database: %s", error)
            if self._stop.wait(self._seconds):
                return
