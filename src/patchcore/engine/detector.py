"""Scoring with a fitted memory bank: what a trained PatchCore and an exported one share.

A :class:`Detector` knows how to turn photos into network inputs (``transform_``) and inputs
into patch features (``embedding_``, torch's network or an ONNX graph); everything after that is
here, torch-free: nearest-neighbour search, the eq. 7 image score, anomaly maps, thresholds,
teach-in. Its settings come from one typed record (:meth:`Detector.settings`), never from
attribute look-ups with fallbacks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ..errors import NotFittedError
from .approximate_search import KINDS as APPROXIMATE_KINDS
from .approximate_search import ApproximateIndex
from .augmentation import Augmenter, ValidRows, augmenter, training_patch_box, valid_cells, view_record
from .coreset import continue_greedy, coreset_size
from .digest import image_sha256
from .geometry import InputTransform, Placement
from .images import ImageSource, LoadedBatch, expand_sources, iterate_batches, source_name
from .patch_store import PatchStore
from .prediction import ErrorHandler, Evidence, Prediction
from .scoring import aggregated_image_score, anomaly_map, network_map, top_patches
from .search import IDLE_CORES, MemoryBankIndex, search_threads
from .self_calibration import (LeftOutScores, calibration_record, chosen_photos, describe_estimate, left_out_scores,
                               photo_groups, score_left_out, thresholds_from, threshold_kind)
from .settings import ModelSettings
from .thresholds import kept_for
from .tiling import TiledEmbedding

#: With ``search_backend="auto"``: exact search up to this many bank vectors, HNSW above. Exact
#: search costs in proportion to the bank, HNSW (M=16, efSearch=16) barely grows with it: for the
#: 2,304 patches of a bottle photo, one thread, 7.7 ms each at 1,000 vectors, exact 11.2 ms against
#: 8.0 at 1,500 and 33 ms against 9 at 4,816.
AUTO_EXACT_LIMIT = 1000
#: Patches re-measured exactly in the first round when an approximate index found the highest
#: scores (twice as many each further round). Approximate search misses most on anomalous patches,
#: the highest: on bottle's test photos 1-23 patches were needed (most often 3-5), on macaroni1's
#: 1-7 (95% at most 4); a few queries cost about one pass over the bank, as one does.
EXACT_RECHECK = 8


class BankFullError(ValueError):
    """Teach-in refused: the memory bank already holds ``max_bank_size`` vectors."""


def embed_batches(
    sources: list[ImageSource],
    transform: InputTransform,
    embedding: Callable[[np.ndarray], object],
    batch_size: int,
    *,
    description: str = "features",
    progress: bool = False,
    on_error: ErrorHandler | None = None,
    keep_images: bool = False,
    augment: Augmenter | None = None,
) -> Iterator[tuple[LoadedBatch, object]]:
    """Decode, transform and embed ``sources`` batch by batch: ``(batch, embedding(batch.pixels))``;
    with ``augment`` (fitting), every copy of each photo (batches then out of order)."""
    batches = iterate_batches(sources, transform, batch_size, on_error=on_error, keep_images=keep_images, augment=augment)
    copies = 1 if augment is None else augment.copies
    runs = 0
    with tqdm(total=len(sources) * copies, desc=description, unit="img", disable=not progress) as bar:
        for batch in batches:
            yield batch, embedding(batch.pixels)
            runs += 1
            bar.update(len(batch.names))
    # What follows a long call (metrics, coreset) need not sit beside the network's memory. Only
    # when the call ran to its end: not while a generator closed early is being finalised, where
    # a stop signal landing in the release would be lost (tests/test_watch.py's stop tests).
    if runs > 1 and isinstance(embedding, TiledEmbedding):
        embedding.release_memory()


def photo_grid(features: np.ndarray, placement: Placement) -> np.ndarray:
    """One image's patch features ``(rows, columns, width)`` over the cells that show its photo:
    the cells wholly in the stride padding are cut off (:attr:`Placement.grid_size`)."""
    rows, columns = placement.grid_size
    return features[:rows, :columns]


def training_store(width: int, augment: Augmenter | None, directory) -> PatchStore | ValidRows:
    """Where training patches wait while a bank is chosen: a :class:`PatchStore`, or, when the
    augmentation turns photos by other angles than quarter turns, :class:`ValidRows` over one, so
    that the cells outside the turned photo never enter the bank."""
    if augment is not None and augment.masks_cells:
        return ValidRows(width, directory=directory)
    return PatchStore(width, directory=directory)


def store_image(store: PatchStore | ValidRows, name: str, features: np.ndarray, placement: Placement,
                key: tuple[int, int]) -> None:
    """Append one input's cells that show its photo to ``store``, with its photo's size, its view and
    its ``key`` (photo position, copy)."""
    grid = photo_grid(features, placement)
    if isinstance(store, ValidRows):
        store.append_image(name, grid, valid_cells(placement))
    else:
        store.append_image(name, grid)
    store.image_sizes.append(list(placement.image_size))
    store.image_views.append(view_record(placement))
    store.image_keys.append(tuple(key))


def training_records(names: list[str], sizes: list, views: list) -> list[dict]:
    """``training_images_`` entries: name and size of each stored image, and the copy (``view``) it
    is when not the photo itself."""
    return [{"name": name, "size": size, **({"view": view} if view else {})} for name, size, view in zip(names, sizes, views)]


class Detector:
    """Scoring, maps, decisions and teach-in over a memory bank.

    Subclasses provide :meth:`settings` and set ``transform_``, ``embedding_`` (numpy pixels ->
    numpy patch features) and the bank with :meth:`_set_memory_bank` and :meth:`_start_bank_state`
    (or :meth:`restore_bank`).
    """

    #: Settings that affect results but that the model file did not record (old exports): teach-in
    #: refuses to guess them.
    unrecorded_settings_: tuple[str, ...] = ()

    def settings(self) -> ModelSettings:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    # -- the memory bank ------------------------------------------------------------------------

    def _set_memory_bank(self, memory_bank: np.ndarray) -> None:
        self.memory_bank_ = np.ascontiguousarray(memory_bank, dtype=np.float32)
        self.exact_index_ = None  # made when an approximate index first needs exact re-checks
        backend = self.settings().search_backend
        if backend == "auto":  # exact where it is cheap, a graph index above that
            backend = "numpy" if len(self.memory_bank_) <= AUTO_EXACT_LIMIT else "hnsw"
        if backend in APPROXIMATE_KINDS:
            self.index_ = ApproximateIndex(self.memory_bank_, backend, seed=self.settings().seed)
        else:
            self.index_ = MemoryBankIndex(self.memory_bank_, backend)

    def _start_bank_state(self) -> None:
        """The learned state besides the bank, as a fresh fit leaves it: no thresholds, no teach-in,
        no known origins (a fit on images sets them after this)."""
        self.threshold_ = self.pixel_threshold_ = self.threshold_source_ = self.calibration_ = None
        self.memory_bank_origin_ = None
        self.training_images_ = []
        self.teach_in_ = []

    def _exact_index(self) -> MemoryBankIndex:
        """Exact search over the bank: the index itself, or one made once beside an approximate index."""
        if isinstance(self.index_, MemoryBankIndex):
            return self.index_
        if self.exact_index_ is None:
            self.exact_index_ = MemoryBankIndex(self.memory_bank_)
        return self.exact_index_

    def search_recall(self, queries: np.ndarray, sample: int = 1000) -> float:
        """The share of ``queries`` (up to ``sample`` of them) whose nearest bank vector the index
        finds exactly: 1.0 for exact search, measured for an approximate index."""
        if isinstance(self.index_, MemoryBankIndex):
            return 1.0
        queries = queries[:: max(1, len(queries) // sample)][:sample]
        _, exact = self._exact_index().search(queries, 1)
        _, found = self.index_.search(queries, 1)
        return float(np.mean(exact[:, 0] == found[:, 0]))

    def _check_fitted(self) -> None:
        if not hasattr(self, "memory_bank_"):
            raise NotFittedError(
                f"this {type(self).__name__} model is not fitted yet: call fit(good_images) or load a saved model first"
            )

    # -- scores -----------------------------------------------------------------------------------

    def score_patches(self, patch_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance of each patch ``(P, D)`` to its nearest memory-bank vector, and that vector's index.

        With an approximate index the highest scores are then made exact: an approximate neighbour
        is never nearer than the true one, so a patch's approximate score bounds its exact score
        from above; patches are re-measured exactly, highest first, until the best exact score
        reaches the next approximate one. The largest patch score (the image score's basis) and
        its bank vector are then the exact ones, at the cost of a few exact searches; other
        patches keep their approximate scores, which can only be a little high.
        """
        self._check_fitted()
        found = [self._first_pass(patch_features)]
        self._recheck([patch_features], found)
        return found[0]

    def score_images(self, features: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """:meth:`score_patches` and :meth:`image_score` of several images' patches ``(P_i, D)``:
        ``(patch scores, nearest bank vectors, image score)`` of each, the same values.

        The exact searches they need (the re-checks of the highest patches, eq. 7's neighbours of
        each ``m*``) are made for all the images at once: each is a pass over the whole bank that
        costs about as much for a few queries as for one.
        """
        self._check_fitted()
        found = [self._first_pass(patches) for patches in features]
        self._recheck(features, found)
        return [(distances, indices, score) for (distances, indices), score in zip(found, self._image_scores(features, found))]

    def _first_pass(self, patch_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each patch's nearest bank vector by the index, and its distance measured as exact search
        measures it: an approximate index's neighbours get true distances (never below the exact
        score), equal to the bit to exact search's where it found the true neighbour."""
        if isinstance(self.index_, MemoryBankIndex):
            distances, indices = self.index_.search(patch_features, 1)
        else:
            indices, _ = self.index_.neighbours(patch_features, 1)
            distances = self._exact_index().distances(patch_features, indices)
        return distances.reshape(-1), indices.reshape(-1)

    def _recheck(self, features: list[np.ndarray], found: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Make the highest approximate patch scores of each image exact, in place (:meth:`score_patches`).

        Rounds re-measure :data:`EXACT_RECHECK` patches of every image not yet settled, twice as
        many each further round, in one exact search: one round settles an image whenever the
        approximate index found its highest patch's true neighbour.
        """
        if isinstance(self.index_, MemoryBankIndex):
            return
        exact_index = self._exact_index()
        orders = [np.argsort(-distances, kind="stable") for distances, _ in found]
        best = [-np.inf] * len(found)
        pending, start, size = list(range(len(found))), 0, EXACT_RECHECK
        while pending:
            chunks = [orders[j][start : start + size] for j in pending]
            exact, nearest = exact_index.search(np.concatenate([features[j][c] for j, c in zip(pending, chunks)]), 1)
            offset = 0
            for j, chunk in zip(pending, chunks):
                distances, indices = found[j]
                distances[chunk] = exact[offset : offset + len(chunk), 0]
                indices[chunk] = nearest[offset : offset + len(chunk), 0]
                best[j] = max(best[j], float(distances[chunk].max()))
                offset += len(chunk)
            start, size = start + size, 2 * size
            pending = [j for j in pending if start < len(orders[j]) and found[j][0][orders[j][start]] > best[j]]

    def _image_scores(self, features: list[np.ndarray], found: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
        """:meth:`image_score` of each image, eq. 7's neighbours of every ``m*`` (of every top
        patch of every image) in one exact search."""
        settings = self.settings()
        exact_index = self._exact_index() if settings.reweight else None
        neighbours: list[np.ndarray | None] = [None] * len(found)
        if settings.reweight and settings.num_neighbours > 1 and exact_index.size >= 2:
            tops = [top_patches(distances, settings.aggregation) for distances, _ in found]
            matched = np.concatenate([indices[top] for (_, indices), top in zip(found, tops)]).astype(np.int64)
            rows = exact_index.search(exact_index.memory_bank[matched], settings.num_neighbours)[1]
            ends = np.cumsum([len(top) for top in tops])
            neighbours = list(np.split(rows, ends[:-1]))
        return [aggregated_image_score(distances, indices, patches, exact_index, settings.aggregation, settings.reweight,
                                       settings.num_neighbours, near)
                for (distances, indices), patches, near in zip(found, features, neighbours)]

    def image_score(self, patch_scores: np.ndarray, nearest: np.ndarray, patch_features: np.ndarray) -> float:
        """Image score from one image's patch scores: by ``aggregation``, the largest patch score
        (``max``, the paper's) or the mean of the largest few, each re-weighted by eq. 7 unless
        ``reweight`` is off.

        Eq. 7's neighbours of the matched bank vectors m* come from exact search (a few queries,
        cheap), so with an approximate index the image score equals exact search's.
        """
        return self._image_scores([patch_features], [(patch_scores, nearest)])[0]

    def predict(
        self, images: ImageSource | Iterable[ImageSource], maps: bool = True, on_error: ErrorHandler | None = None,
        keep_images: bool = False, evidence: int = 0,
    ) -> list[Prediction]:
        """Score images; with ``maps`` also return each anomaly map at the image's original size.

        A bad image raises :class:`ImageLoadError` naming it, unless ``on_error`` takes it (then it
        is skipped). ``keep_images`` returns each decoded photo with its prediction. ``evidence``:
        for that many of the most anomalous patches (apart from each other), the nearest normal
        patch of the training images (:class:`~patchcore.engine.prediction.Evidence`).
        """
        self._check_fitted()
        return list(self.iter_predict(images, maps, on_error, keep_images, evidence))

    def iter_predict(
        self, images: ImageSource | Iterable[ImageSource], maps: bool = True, on_error: ErrorHandler | None = None,
        keep_images: bool = False, evidence: int = 0,
    ) -> Iterator[Prediction]:
        """As :meth:`predict`, one result at a time, so that long runs keep what is done."""
        self._check_fitted()
        settings = self.settings()
        sources = expand_sources(images)
        started = time.perf_counter()
        for batch, features in embed_batches(sources, self.transform_, self.embedding_, settings.batch_size,
                                             description="predict", progress=settings.progress, on_error=on_error,
                                             keep_images=keep_images):
            backbone_seconds = (time.perf_counter() - started) / len(batch.names)
            grids = [photo_grid(features[i], placement) for i, placement in enumerate(batch.placements)]
            # The network is idle now: search and maps may use the cores that others leave idle.
            with search_threads(IDLE_CORES.free(settings.threads)):
                t0 = time.perf_counter()
                scored = self.score_images([grid.reshape(-1, grid.shape[-1]) for grid in grids])
                search_seconds = (time.perf_counter() - t0) / len(batch.names)
                pixel_maps, map_seconds = [], []
                for (patch_scores, _, _), grid, placement in zip(scored, grids, batch.placements):
                    t1 = time.perf_counter()
                    pixel_maps.append(anomaly_map(patch_scores.reshape(grid.shape[:2]), placement,
                                                  settings.smoothing_sigma) if maps else None)
                    map_seconds.append(time.perf_counter() - t1)
            for i, name in enumerate(batch.names):
                patch_scores, nearest, score = scored[i]
                grid = patch_scores.reshape(grids[i].shape[:2])
                timings = {"backbone": backbone_seconds, "search": search_seconds, "map": map_seconds[i]}
                image = batch.images[i] if keep_images else None
                prediction = Prediction(name, score, pixel_maps[i], grid, timings, placement=batch.placements[i],
                                        image=image, evidence=self.evidence_for(grid, nearest, batch.placements[i], evidence))
                yield prediction.decide(self.threshold_, self.pixel_threshold_)
            started = time.perf_counter()

    def evidence_for(self, patch_scores: np.ndarray, nearest: np.ndarray, placement: Placement, count: int,
                     spacing: int = 2) -> list[Evidence]:
        """The ``count`` highest-scoring patches of a grid, no two within ``spacing`` cells of each
        other, each with the training patch its score was measured against (none when the bank's
        origins are unknown, as for a model fitted on a bare feature matrix)."""
        origins = self.memory_bank_origin_
        if count <= 0 or origins is None:
            return []
        rows, columns = patch_scores.shape
        cell = placement.cell
        chosen: list[tuple[int, int, int]] = []
        for flat in np.argsort(-patch_scores, axis=None, kind="stable"):
            row, column = divmod(int(flat), columns)
            if all(abs(row - r) > spacing or abs(column - c) > spacing for r, c, _ in chosen):
                chosen.append((row, column, int(flat)))
                if len(chosen) == count:
                    break
        found = []
        for row, column, flat in chosen:
            image, training_row, training_column = (int(v) for v in origins[int(nearest[flat])])
            training = self.training_images_[image]
            # A copy's (augment) patch is mapped back onto the training photo as it is on disk.
            training_box = training_patch_box(self.transform_, training, training_row, training_column, cell)
            found.append(Evidence(row, column, placement.patch_box(row, column, cell), float(patch_scores[row, column]),
                                  training["name"], training_row, training_column, training_box))
        return found

    def anomaly_map_of(self, prediction: Prediction) -> np.ndarray:
        """The anomaly map of a prediction made with ``maps=False``, over its whole photo."""
        self._check_fitted()
        if prediction.placement is None:
            raise ValueError(f"{prediction.name}: the prediction does not say where its input came from")
        return anomaly_map(prediction.patch_scores, prediction.placement, self.settings().smoothing_sigma)

    # -- decisions --------------------------------------------------------------------------------

    def set_threshold(self, threshold: float, pixel_threshold: float | None = None, source: str = "user",
                      calibration: dict | None = None):
        """Decide ``is_anomalous = score >= threshold``; masks mark pixels ``>= pixel_threshold``
        (no masks without one: image scores and pixel maps are on different scales). ``calibration``:
        how the thresholds were calibrated (``calibration_``; ``None`` when set by hand)."""
        self._check_fitted()
        for name, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
            if value is not None and not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        self.threshold_ = float(threshold)
        self.pixel_threshold_ = None if pixel_threshold is None else float(pixel_threshold)
        self.threshold_source_ = source
        self.calibration_ = calibration
        return self

    def threshold_kind(self) -> str:
        """Which kind of threshold decides verdicts, in words (``none``, ``self-calibrated from N
        training photos``, ``calibrated on N held-out good photos``, ``set by hand``)."""
        return threshold_kind(self.threshold_, self.calibration_, self.threshold_source_)

    def threshold_estimate(self) -> str | None:
        """The false-positive rate the calibration expects of the image threshold, with its
        interval, in words (``None`` without a calibration record)."""
        return None if not self.calibration_ else describe_estimate(self.calibration_)

    def calibrate_threshold(
        self,
        good_images: ImageSource | Iterable[ImageSource],
        max_false_positive_rate: float = 0.01,
        max_pixel_false_positive_rate: float = 0.001,
    ):
        """Set both thresholds from held-out good images only.

        The image threshold flags at most ``max_false_positive_rate`` of the good images; the pixel
        threshold flags at most ``max_pixel_false_positive_rate`` of their pixels (measured on the
        maps at network resolution, whose values the full-size maps only resample).
        """
        predictions = self.predict(good_images, maps=False)
        sigma = self.settings().smoothing_sigma
        with search_threads(IDLE_CORES.free(self.settings().threads)):
            found = [LeftOutScores.of(p.score, network_map(p.patch_scores, p.placement, sigma)) for p in predictions]
        if not found:
            raise ValueError("no good images to calibrate on")
        threshold, pixel_threshold = thresholds_from(found, max_false_positive_rate, max_pixel_false_positive_rate)
        return self.set_threshold(
            threshold, pixel_threshold,
            source=f"{len(found)} good images: image false-positive rate <= {max_false_positive_rate}, "
                   f"pixel false-positive rate <= {max_pixel_false_positive_rate}",
            calibration=calibration_record("held-out", [p.name for p in predictions], found, max_false_positive_rate,
                                           max_pixel_false_positive_rate),
        )

    def self_calibrate_threshold(
        self,
        grids: Callable[[list[int]], Iterable[np.ndarray]] | None = None,
        max_false_positive_rate: float | None = None,
        max_pixel_false_positive_rate: float | None = None,
        photos: int | None | str = "setting",
        neighbours: int = 0,
    ):
        """Set both thresholds from the training photos themselves, with no held-out photos: each
        photo of a seeded sample (``photos``, default the setting ``calibration_photos``; ``None``:
        all) is scored against the bank without the vectors that came from it or from its copies
        (leave one photo out, :mod:`.self_calibration`), and the thresholds flag at most the
        given shares of those scores and pixels (default: the settings ``max_fpr`` and
        ``max_pixel_fpr``). ``neighbours``: also leave out the bank vectors of that many photos
        either side in training order.

        ``grids``: the patch features of training images by index, in the order asked (the fit
        passes its stored patches); by default the photos are read again from the names the bank
        records (teach-in's recalibration: they must still be there).
        """
        self._check_fitted()
        if self.memory_bank_origin_ is None:
            raise ValueError("the model does not record which training photo each memory-bank vector came from "
                             "(fitted on a bare feature matrix, or saved by an older patchcore): self-calibration needs "
                             "it; calibrate on held-out good photos instead")
        started = time.perf_counter()
        settings = self.settings()
        rate = settings.max_fpr if max_false_positive_rate is None else max_false_positive_rate
        pixel_rate = settings.max_pixel_fpr if max_pixel_false_positive_rate is None else max_pixel_false_positive_rate
        groups = photo_groups(self.training_images_)
        if len(groups) < 2:
            raise ValueError(f"self-calibration needs at least 2 training photos, the bank came from {len(groups)}")
        chosen = chosen_photos(len(groups), settings.calibration_photos if photos == "setting" else photos, settings.seed)
        images = [next(i for i in groups[p] if "view" not in self.training_images_[i]) for p in chosen]
        records = [self.training_images_[i] for i in images]
        placements = [self.transform_.placement(record["size"][1], record["size"][0]) for record in records]
        exact = self._exact_index()
        # The most pixels of one photo that the pixel threshold over all of them can need.
        keep = kept_for(sum(p.content_size[0] * p.content_size[1] for p in placements), pixel_rate)

        def scorer(grid: np.ndarray, placement: Placement, excluded: np.ndarray) -> LeftOutScores:
            return left_out_scores(self.index_, exact, grid, placement, excluded, settings.aggregation,
                                   settings.reweight, settings.num_neighbours, settings.smoothing_sigma, keep)

        features = (grids or self._training_grids)(images)
        with search_threads(IDLE_CORES.free(settings.threads)):
            found = score_left_out(zip(chosen, features, placements), groups, self.memory_bank_origin_, scorer, neighbours)
        threshold, pixel_threshold = thresholds_from(found, rate, pixel_rate)
        return self.set_threshold(
            threshold, pixel_threshold,
            source=f"{len(found)} training photos, each left out of the bank in turn: image false-positive rate <= "
                   f"{rate}, pixel false-positive rate <= {pixel_rate}",
            calibration=calibration_record("self", [record["name"] for record in records], found, rate, pixel_rate,
                                           neighbours, time.perf_counter() - started),
        )

    def _training_grids(self, images: list[int]) -> Iterator[np.ndarray]:
        """The patch features of training images ``images``, read again from the files the bank
        records (each must still be there, unchanged)."""
        names = [self.training_images_[i]["name"] for i in images]
        missing = [name for name in names if not Path(name).is_file()]
        if missing:
            raise ValueError(f"self-calibration reads the training photos again, and {len(missing)} of {len(names)} are "
                             f"not there (e.g. {missing[0]}): run it where they are, or calibrate on held-out good photos")
        return self.photo_grids(names)

    def photo_grids(self, sources: list[ImageSource]) -> Iterator[np.ndarray]:
        """Each photo's patch features ``(rows, columns, width)`` over the cells that show it, in
        float16 precision as a fit stores them: what self-calibration scores of a training photo."""
        settings = self.settings()
        for batch, features in embed_batches(sources, self.transform_, self.embedding_, settings.batch_size,
                                             description="self-calibration", progress=settings.progress):
            for grid, placement in zip(features, batch.placements):
                yield photo_grid(grid, placement).astype(np.float16).astype(np.float32)

    # -- teach-in -----------------------------------------------------------------------------------

    def partial_fit(self, images: ImageSource | Iterable[ImageSource], on_error: ErrorHandler | None = None,
                    coreset_ratio: float | None = None):
        """Add good images without refitting: their patches join the bank by continuing the greedy
        coreset selection from the current bank (the old images are not needed again).

        The farthest new patches are added first, ``coreset_ratio`` (default: the model's) of the new
        patches; patches the bank already covers exactly add nothing. ``max_bank_size`` is honoured:
        when the bank is full, :class:`BankFullError`; when it would overflow, only the farthest
        patches that fit are added (recorded as ``capped``). Thresholds are kept (call
        :meth:`calibrate_threshold` to set them again). What was added, with each image's SHA-256,
        is recorded in ``teach_in_`` (and saved).
        """
        self._check_fitted()
        settings = self.settings()
        if coreset_ratio is None and "coreset_ratio" in self.unrecorded_settings_:
            raise ValueError("this model file does not record its coreset ratio (an export written by patchcore "
                             "before 0.3): give the share of new patches to keep (coreset_ratio=, or patchcore add "
                             "--coreset-ratio), or export the saved model again")
        ratio = settings.coreset_ratio if coreset_ratio is None else coreset_ratio
        room = None if settings.max_bank_size is None else settings.max_bank_size - len(self.memory_bank_)
        if room is not None and room <= 0:
            raise BankFullError(f"the memory bank is full ({len(self.memory_bank_)} vectors, max_bank_size "
                                f"{settings.max_bank_size}): fit the model again on all its good images, or fit it "
                                "with a larger max_bank_size")
        started = time.perf_counter()
        sources = expand_sources(images)
        digests = {source_name(source, position): image_sha256(source) for position, source in enumerate(sources)}
        first_image = len(self.training_images_)
        # The model's augmentation applies to what it is taught too: the copies of each new photo.
        augment = augmenter(settings.augment, self.transform_)
        with training_store(self.memory_bank_.shape[1], augment, settings.scratch_dir) as store:
            for batch, features in embed_batches(sources, self.transform_, self.embedding_, settings.batch_size,
                                                 description="teach-in", progress=settings.progress, on_error=on_error,
                                                 augment=augment):
                for i, name in enumerate(batch.names):
                    store_image(store, name, features[i], batch.placements[i], batch.keys[i])
            if not len(store):
                raise ValueError("no usable images to add: every image was skipped")
            candidates = store.read(0, len(store))
            wanted = coreset_size(len(store), ratio)
            picks = continue_greedy(self.memory_bank_, candidates, wanted if room is None else min(wanted, room),
                                    settings.projection_dim, settings.seed)
            origins = store.origins(picks)
            records = training_records(store.image_names, store.image_sizes, store.image_views)
        origins[:, 0] += first_image
        bank = np.concatenate([self.memory_bank_, candidates[picks]])
        old_origins = self.memory_bank_origin_
        self._set_memory_bank(bank)  # a new index: requests using the old one are not disturbed
        if old_origins is not None:
            self.memory_bank_origin_ = np.concatenate([old_origins, origins]).astype(np.int32)
            self.training_images_ = list(self.training_images_) + records
        names = [record["name"] for record in records if "view" not in record]  # the photos, not their copies
        self.n_training_patches_ += len(candidates)
        if self.n_training_images_ is not None:
            self.n_training_images_ += len(names)
        self.teach_in_ = list(self.teach_in_) + [{
            "images": len(names), "sources": [{"name": name, "sha256": digests[name]} for name in names],
            "patches": len(candidates), "added_to_bank": len(picks), "capped": room is not None and wanted > room,
            "bank_size": int(bank.shape[0]), "seconds": round(time.perf_counter() - started, 3),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }]
        return self

    # -- what a model file keeps ----------------------------------------------------------------------

    def bank_tensors(self) -> dict[str, np.ndarray]:
        """The arrays a saved model keeps of its memory bank: the vectors and where each came from."""
        tensors = {"memory_bank": self.memory_bank_}
        if self.memory_bank_origin_ is not None:
            tensors["origin"] = self.memory_bank_origin_
        return tensors

    def bank_state(self) -> dict:
        """The training images the bank's vectors came from (names and sizes), for evidence, the
        good images taught in since the fit, and how many images and patches the bank was chosen from."""
        return {"training_images": self.training_images_ if self.memory_bank_origin_ is not None else None,
                "teach_in": self.teach_in_, "n_training_images": self.n_training_images_,
                "n_training_patches": self.n_training_patches_}

    def restore_bank(self, tensors: dict[str, np.ndarray], state: dict) -> None:
        """The inverse of :meth:`bank_tensors` and :meth:`bank_state`."""
        self._set_memory_bank(tensors["memory_bank"])
        self._start_bank_state()
        self.teach_in_ = list(state.get("teach_in") or [])
        self.n_training_images_ = state["n_training_images"]
        self.n_training_patches_ = state["n_training_patches"]
        if "origin" in tensors and state.get("training_images"):
            self.memory_bank_origin_ = np.asarray(tensors["origin"], dtype=np.int32)
            self.training_images_ = list(state["training_images"])

    def version_event(self, event: dict | None) -> dict:
        """What the model directory's history records of a save: ``event`` (``action``, ``who``)
        with the bank's size and, after teach-in, the images taught (count and SHA-256 each)."""
        event = {"action": "save", "who": "library", **(event or {}), "bank_size": int(len(self.memory_bank_))}
        if event["action"] == "teach-in" and self.teach_in_:
            last = self.teach_in_[-1]
            event.update({key: last[key] for key in ("images", "sources", "added_to_bank", "capped") if key in last})
        return event

    def decision_state(self) -> dict:
        """What a saved model records besides its settings and tensors: thresholds and the normal scale."""
        return {
            "normal_patch_score_mean": self.normal_patch_score_mean_,
            "normal_patch_score_std": self.normal_patch_score_std_,
            "threshold": self.threshold_,
            "pixel_threshold": self.pixel_threshold_,
            "threshold_source": self.threshold_source_,
            "calibration": self.calibration_,
        }

    def restore_decision_state(self, state: dict) -> None:
        """The inverse of :meth:`decision_state` (models saved before the normal scale count as unscaled)."""
        self.normal_patch_score_mean_ = float(state.get("normal_patch_score_mean", 0.0))
        self.normal_patch_score_std_ = float(state.get("normal_patch_score_std", 1.0))
        if state.get("threshold") is not None:
            self.set_threshold(state["threshold"], state.get("pixel_threshold"), state.get("threshold_source") or "saved",
                               state.get("calibration"))
