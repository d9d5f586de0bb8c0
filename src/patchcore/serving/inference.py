"""Scoring uploads within bounded resources: a few inference slots, a bounded queue, a small decode pool.

At most ``slots`` images are scored at once. A request that finds a free slot runs at once;
otherwise it waits, unless ``max_queue`` requests are already waiting, and then it is refused
(503 with ``Retry-After``) instead of piling up.

An upload is decoded before it takes a slot, in a pool of ``decoders`` threads of its own, so the
next photos are decoded while the slots' network and search run (with one slot, decoding inside
it left the slot's cores idle for the decode's ~10-20 ms of each photo). Memory stays bounded: a
request takes one of ``slots + decoders`` places before its photo is decoded and gives it back
when it is scored, so at most that many decoded photos exist at once; the rest wait as the bytes
of their upload.

The work runs on fixed pools only, and a waiting request holds no thread: it is a job in a pool's
queue that the web handler awaits. So scoring never takes the web server's thread-pool tokens,
and ``/healthz`` or ``/metrics`` answer however many requests wait (with blocking waits, 40
waiting requests held every token and health probes hung). One scoring pool also keeps memory
flat: every thread that calls into torch keeps its own OpenMP team and oneDNN scratch memory, so
running it on the web server's many threads made memory grow with the number of clients (load
test: 1.1 GiB for 50).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from ..engine.cpus import available_cpus
from ..engine.evidence import evidence_picture
from ..engine.geometry import photo_size
from ..engine.images import TooManyPixels, read_image
from ..errors import ImageLoadError
from .guard import ServiceError
from .metrics import Metrics
from .models import ServedModel
from .rendering import png_base64, render_outputs

T = TypeVar("T")

#: Formats decoded from uploads; anything else is refused without trying other Pillow plugins.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


#: Most threads that decode uploads before they take a slot: one per slot up to this many (a
#: 900x900 PNG decodes in ~12 ms, several times faster than a slot scores it).
DECODERS = 2


def default_slots(threads: int | None = None) -> int:
    """One slot per group of ``threads`` network threads the machine's cores allow (default: one
    slot whose network uses every core)."""
    cores = available_cpus()
    return max(1, cores // max(1, threads or cores))


class InferenceRunner:
    """Runs :meth:`score` for the web handlers; see the module's description for the limits."""

    def __init__(self, metrics: Metrics, slots: int, max_queue: int, max_image_pixels: int,
                 max_input_pixels: int, max_map_side: int) -> None:
        if slots < 1:
            raise ValueError(f"inference_slots must be at least 1, got {slots}")
        if max_queue < 0:
            raise ValueError(f"max_queue must not be negative, got {max_queue}")
        self.metrics = metrics
        self.slots = slots
        self.max_queue = max_queue
        self.max_image_pixels = max_image_pixels
        self.max_input_pixels = max_input_pixels
        self.max_map_side = max_map_side
        self._admitted = 0  # scoring now or waiting for a slot
        self._lock = threading.Lock()  # guards _admitted and the metrics' in_flight and waiting
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="patchcore-inference")
        self.decoders = max(1, min(DECODERS, slots, available_cpus()))
        self._decode_pool = ThreadPoolExecutor(max_workers=self.decoders, thread_name_prefix="patchcore-upload-decode")
        #: Places for decoded photos: taken before decoding, given back once scored.
        self._photo_places = threading.BoundedSemaphore(slots + self.decoders)
        self.photos_held = 0  # decoded (or being decoded) and not yet scored; at most slots + decoders

    def _admit(self) -> None:
        """Take a free slot or a place in the queue; 503 when every slot and place is taken."""
        with self._lock:
            if self._admitted >= self.slots + self.max_queue:
                raise ServiceError(503, "the service is overloaded; retry shortly", {"Retry-After": "1"})
            self._admitted += 1
            self.metrics.waiting += 1

    def _started(self) -> None:
        with self._lock:
            self.metrics.waiting -= 1
            self.metrics.in_flight += 1

    def _left(self, started: bool) -> None:
        with self._lock:
            self._admitted -= 1
            if started:
                self.metrics.in_flight -= 1
            else:
                self.metrics.waiting -= 1

    def decode(self, served: ServedModel, data: bytes, name: str):
        """An upload decoded as ``patchcore predict`` decodes files (JPEGs at the scale the network
        needs), within the size limits; :class:`ImageLoadError` when it cannot be used."""
        transform = served.model.transform_
        photo = read_image(data, name=name, max_pixels=self.max_image_pixels, formats=UPLOAD_FORMATS,
                           needed_size=transform.needed_size)
        photo_width, photo_height = photo_size(photo)
        height, width = transform.input_size(photo_width, photo_height)
        if height * width > self.max_input_pixels or transform.resized_pixels(photo_width, photo_height) > self.max_image_pixels:
            raise ImageLoadError(name, f"image of {photo_width}x{photo_height} pixels would become too large for the "
                                       f"model after its resize ({width}x{height} network input; limit "
                                       f"{self.max_input_pixels} pixels): extreme aspect ratio, or a model that keeps "
                                       "the photo's own size")
        return photo

    @staticmethod
    def refusal(error: ImageLoadError) -> ServiceError:
        """The answer to an image that cannot be used: 413 when too large, else 422."""
        return ServiceError(413 if isinstance(error, TooManyPixels) else 422, f"cannot use the image: {error.problem}")

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """Run ``work(*args)`` in an inference slot: scoring and teaching share the slots, so memory
        and CPU stay bounded whatever the mix of requests. Waits for a slot without holding a
        thread; 503 at once when the queue is full."""
        self._admit()

        def in_slot() -> T:
            self._started()
            try:
                return work(*args)
            finally:
                self._left(started=True)

        job = self._pool.submit(in_slot)
        # A job cancelled before it started (its client went away) gives its place back here.
        job.add_done_callback(lambda done: self._left(started=False) if done.cancelled() else None)
        return await asyncio.wrap_future(job)

    async def score(self, served: ServedModel, data: bytes, name: str, want_map: bool, want_overlay: bool,
                    want_mask: bool, evidence: int = 0) -> dict[str, Any]:
        """Decode ``data`` once (in the decode pool), score it with ``served`` in a slot, render what
        was asked for; with ``evidence``, that many anomalous patches each beside its nearest
        normal patch of the training images. Admitted, queued and refused as :meth:`run`."""
        self._admit()
        outcome: Future = Future()
        self._decode_pool.submit(self._decode_then_queue, outcome, served, data, name,
                                 (want_map, want_overlay, want_mask, evidence), time.perf_counter())
        # Cancelled (the client went away), the outcome tells the stages not to start.
        return await asyncio.wrap_future(outcome)

    def _decode_then_queue(self, outcome: Future, served: ServedModel, data: bytes, name: str, wanted: tuple,
                           queued: float) -> None:
        """:meth:`score`'s first stage, in the decode pool: decode the upload in a place of its own,
        then queue its scoring for a slot."""
        error = None
        if not outcome.cancelled():
            self._take_place()
            try:
                if not outcome.cancelled():  # the client may have gone while every place was taken
                    t0 = time.perf_counter()
                    photo = self.decode(served, data, name)
                    timings = {"queue": t0 - queued, "decode": time.perf_counter() - t0}
                    self._pool.submit(self._score_in_slot, outcome, served, photo, name, wanted, timings,
                                      time.perf_counter())
                    return  # the place goes with the photo to the slot
            except ImageLoadError as exc:
                self.metrics.count_inference(served.name, "bad_image")
                error = self.refusal(exc)
            except BaseException as exc:  # noqa: BLE001 - a bug, or the pool shut down: the request hears of it
                error = exc
            self._give_place()
        self._left(started=False)
        if error is not None:
            self._finish(outcome, error=error)

    def _score_in_slot(self, outcome: Future, served: ServedModel, photo, name: str, wanted: tuple,
                       timings: dict[str, float], queued: float) -> None:
        """:meth:`score`'s second stage, on one of the slots' threads: score and render."""
        if not outcome.set_running_or_notify_cancel():  # the client went away while it waited
            self._give_place()
            self._left(started=False)
            return
        self._started()
        result = error = None
        try:
            timings["queue"] += time.perf_counter() - queued
            result = self._score_now(served, photo, name, *wanted, timings)
        except BaseException as exc:  # noqa: BLE001 - every failure reaches the request
            error = exc
        finally:
            del photo
            self._give_place()
            self._left(started=True)  # before answering, so that an answered request is no longer counted
        self._finish(outcome, result, error)

    @staticmethod
    def _finish(outcome: Future, result: Any = None, error: BaseException | None = None) -> None:
        """Answer the request awaiting ``outcome`` (unless it went away)."""
        if outcome.running() or outcome.set_running_or_notify_cancel():
            if error is None:
                outcome.set_result(result)
            else:
                outcome.set_exception(error)

    def _take_place(self) -> None:
        self._photo_places.acquire()
        with self._lock:
            self.photos_held += 1

    def _give_place(self) -> None:
        with self._lock:
            self.photos_held -= 1
        self._photo_places.release()

    def _score_now(self, served: ServedModel, photo, name: str, want_map: bool, want_overlay: bool,
                   want_mask: bool, evidence: int, timings: dict[str, float]) -> dict[str, Any]:
        """Score a decoded upload and render what was asked for, in a slot."""
        photo_width, photo_height = photo_size(photo)
        need_map = want_map or want_overlay or (want_mask and served.pixel_threshold is not None)
        if evidence and served.model.memory_bank_origin_ is None:
            raise ServiceError(422, f"model {served.name!r} does not record where its memory bank came from "
                                    "(saved by an older patchcore): it cannot give evidence")
        try:
            prediction = served.model.predict([photo], need_map, None, False, evidence)[0]
        except ImageLoadError as exc:  # a photo of no use to this model (its transform refused it)
            self.metrics.count_inference(served.name, "bad_image")
            raise self.refusal(exc) from None
        for stage in ("backbone", "search", "map"):
            timings[stage] = prediction.timings.get(stage, 0.0)
        t0 = time.perf_counter()
        result: dict[str, Any] = {
            "model": served.name,
            "model_version": served.version,
            "score": prediction.score,
            "is_anomalous": prediction.is_anomalous,
            "threshold": served.threshold,
            "threshold_kind": served.model.threshold_kind(),
            "width": photo_width,
            "height": photo_height,
        }
        if need_map:
            result.update(render_outputs(prediction, photo, served.model, self.max_map_side,
                                         want_map, want_overlay, want_mask))
        elif want_mask:
            result["mask_png"] = None
        if evidence:
            result["evidence"] = [{**item.to_dict(), "picture_png": png_base64(evidence_picture(photo, item))}
                                  for item in prediction.evidence]
        timings["encode"] = time.perf_counter() - t0
        result["timing_ms"] = {stage: round(seconds * 1000.0, 3) for stage, seconds in timings.items()}
        self.metrics.count_inference(served.name, "ok")
        return result
