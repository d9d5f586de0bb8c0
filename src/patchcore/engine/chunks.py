"""Chunks of training photos: the unit of a chunked fit, on one machine or spread over Ray workers.

A chunk is ``photos_per_chunk`` consecutive photos of the training list, with their turned and
mirrored copies when augmenting (:class:`ChunkPlan`). Each chunk is reduced on its own to the
patches greedy keeps of it, with where each came from and a seeded sample of its patches for the
reference scores (:func:`reduce_chunk`); :func:`merge_chunks` chooses the bank from the union of
the chunks' picks. A chunk's reduction needs nothing from the other chunks, not even how many
patches they hold (:func:`~patchcore.engine.coreset.chunk_share`): the same chunks reduced here one
after another, or by Ray workers in any order (:mod:`patchcore.fleet.distributed_fit`), give the
same bank.

A chunk's patches are read in one order whatever order the fit stored them in (augmented copies
are batched by size): by photo, copy, then grid cell.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np

from .detector import training_records
from .coreset import Chunking, chunk_picks, chunk_share, coreset_size, merge_picks, projection_matrix


@dataclass(frozen=True)
class ChunkPlan:
    """Which photos (positions in the training list) each chunk holds."""

    total_photos: int
    photos_per_chunk: int

    @classmethod
    def for_photos(cls, total_photos: int, rows_per_photo: int, chunking: Chunking) -> "ChunkPlan":
        """Chunks of about ``chunking.chunk_size`` patches, sized by the first photo's ``rows_per_photo``."""
        return cls(total_photos, max(1, chunking.chunk_size // max(1, rows_per_photo)))

    @property
    def n_chunks(self) -> int:
        return -(-self.total_photos // self.photos_per_chunk)

    def photos(self, chunk: int) -> range:
        start = chunk * self.photos_per_chunk
        return range(start, min(start + self.photos_per_chunk, self.total_photos))

    def reference_share(self, reference_patches: int) -> int:
        """Reference patches each chunk draws: an equal share of ``reference_patches``."""
        return -(-reference_patches // self.n_chunks)


@dataclass(frozen=True)
class CoresetSettings:
    """The settings a chunk's reduction and the merge read (from the model's :class:`ModelSettings`)."""

    coreset_ratio: float
    max_bank_size: int | None
    projection_dim: int
    seed: int


@dataclass(frozen=True, eq=False)  # holds arrays
class ChunkCoreset:
    """What greedy keeps of one chunk, with provenance: what a Ray worker sends back."""

    chunk: int
    #: Training patches in the chunk.
    rows: int
    #: ``(k, width)`` float16: the kept patches, in the chunk's order.
    picks: np.ndarray
    #: ``(k,)`` their rows in the chunk's order.
    pick_rows: np.ndarray
    #: ``(k, 3)`` int32: (image in ``images``, grid row, grid column) of each.
    pick_origins: np.ndarray
    #: ``(m, width)`` float16: a seeded sample of the chunk's patches (the reference scores).
    reference: np.ndarray
    #: ``training_images_`` records of the chunk's stored images (photos and copies), in order.
    images: list[dict]

    def to_bytes(self) -> bytes:
        """A self-contained, pickle-free encoding (numpy's .npz with the records as JSON)."""
        buffer = io.BytesIO()
        np.savez(buffer, picks=self.picks, pick_rows=self.pick_rows, pick_origins=self.pick_origins,
                 reference=self.reference,
                 meta=np.frombuffer(json.dumps({"chunk": self.chunk, "rows": self.rows, "images": self.images}).encode(),
                                    dtype=np.uint8))
        return buffer.getvalue()

    @classmethod
    def empty(cls, chunk: int, width: int, images: list[dict] | None = None) -> "ChunkCoreset":
        """A chunk none of whose photos could be read."""
        nothing = np.empty((0, width), np.float16)
        return cls(chunk, 0, nothing, np.empty(0, np.int64), np.empty((0, 3), np.int32), nothing, images or [])

    @classmethod
    def from_bytes(cls, data: bytes) -> "ChunkCoreset":
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            meta = json.loads(arrays["meta"].tobytes())
            return cls(int(meta["chunk"]), int(meta["rows"]), arrays["picks"], arrays["pick_rows"],
                       arrays["pick_origins"], arrays["reference"], list(meta["images"]))


@dataclass(frozen=True, eq=False)  # holds arrays
class ChosenBank:
    """The memory bank a fit chose (from the chunks' picks, or by greedy over every patch), and
    what the model records of the training set."""

    memory_bank: np.ndarray
    #: (image in ``images``, row, column) of each bank vector.
    origins: np.ndarray
    #: Each bank vector's row among all training patches (chunk order, then each chunk's order).
    indices: np.ndarray
    images: list[dict]
    n_patches: int
    reference: np.ndarray


def store_photo_keys(store) -> tuple[list[tuple[int, int]], int]:
    """``(photo position, copy)`` of each image in a fit's patch store, and the number of photos
    the fit was given (bad ones included): what the fit recorded, else each image a photo."""
    if len(store.image_keys) != len(store.image_names):  # a store filled image by image, not by a fit
        return [(i, 0) for i in range(len(store.image_names))], len(store.image_names)
    return [tuple(key) for key in store.image_keys], store.photo_count


def first_photo_rows(store, keys: list[tuple[int, int]]) -> int:
    """Patches of the first photo the store holds (all its copies): what sizes the chunks."""
    first = min(position for position, _ in keys)
    spans = [store.image_rows(i) for i, key in enumerate(keys) if key[0] == first]
    return sum(stop - start for start, stop in spans)


def reduce_chunk(store, keys: list[tuple[int, int]], chunk: int, plan: ChunkPlan, settings: CoresetSettings,
                 chunking: Chunking, reference_patches: int, threads: int = 1, position_offset: int = 0) -> ChunkCoreset:
    """The patches greedy keeps of chunk ``chunk`` of ``store`` (a fit's :class:`~.patch_store.PatchStore`
    or :class:`~.augmentation.ValidRows`; ``keys`` as :func:`store_photo_keys`, positions plus
    ``position_offset`` being positions in the whole training list), with provenance and a seeded
    sample of ``plan.reference_share(reference_patches)`` of its patches."""
    photos = plan.photos(chunk)
    images = sorted((key[0] + position_offset, key[1], i) for i, key in enumerate(keys)
                    if key[0] + position_offset in photos)
    spans = [store.image_rows(i) for _, _, i in images]
    offsets = np.cumsum([0] + [stop - start for start, stop in spans])
    rows = np.empty((int(offsets[-1]), store.width), np.float32)
    for (start, stop), at in zip(spans, offsets):
        rows[at : at + stop - start] = store.read(start, stop)
    records = training_records([store.image_names[i] for _, _, i in images], [store.image_sizes[i] for _, _, i in images],
                               [store.image_views[i] for _, _, i in images])
    width = store.width
    if not len(rows):  # every photo of the chunk was skipped
        return ChunkCoreset.empty(chunk, width, records)
    share = chunk_share(len(rows), len(photos), plan.total_photos, settings.coreset_ratio, settings.max_bank_size,
                        chunking.oversampling)
    local = chunk_picks(rows, share, projection_matrix(width, settings.projection_dim, settings.seed), threads)
    image = np.searchsorted(offsets, local, side="right") - 1
    store_rows = np.array([spans[j][0] for j in image], dtype=np.int64) + (local - offsets[image])
    origins = store.origins(store_rows)
    origins[:, 0] = image  # the chunk's own image order
    rng = np.random.default_rng([settings.seed, chunk])
    sample = np.sort(rng.choice(len(rows), min(len(rows), plan.reference_share(reference_patches)), replace=False))
    return ChunkCoreset(chunk, len(rows), rows[local].astype(np.float16), local.astype(np.int64), origins.astype(np.int32),
                        rows[sample].astype(np.float16), records)


def merge_chunks(chunks: Iterable[ChunkCoreset], settings: CoresetSettings, progress: bool = False,
                 threads: int = 1) -> ChosenBank:
    """The bank greedy chooses from the union of the chunks' picks (``chunks`` in any order)."""
    chunks = sorted(chunks, key=lambda c: c.chunk)
    if not chunks or not any(c.rows for c in chunks):
        raise ValueError("no usable training images: every image was skipped")
    width = next(c.picks.shape[1] for c in chunks if c.rows)
    row_offsets = np.cumsum([0] + [c.rows for c in chunks])
    image_offsets = np.cumsum([0] + [len(c.images) for c in chunks])
    union = np.concatenate([c.picks for c in chunks]).astype(np.float32)
    union_rows = np.concatenate([c.pick_rows + row_offsets[i] for i, c in enumerate(chunks)])
    union_origins = np.concatenate([c.pick_origins + np.array([image_offsets[i], 0, 0], np.int32)
                                    for i, c in enumerate(chunks)])
    n_patches = int(row_offsets[-1])
    n_select = coreset_size(n_patches, settings.coreset_ratio, settings.max_bank_size)
    matrix = projection_matrix(width, settings.projection_dim, settings.seed)
    kept = np.sort(merge_picks(union, n_select, matrix, progress, threads))
    return ChosenBank(union[kept], union_origins[kept], union_rows[kept],
                      [record for c in chunks for record in c.images], n_patches,
                      np.concatenate([c.reference for c in chunks]).astype(np.float32))


def in_store_order(bank: ChosenBank, store) -> ChosenBank:
    """``bank`` (chosen from ``store``'s chunks, whose images it lists by photo and copy) with its
    training images in the order ``store`` holds them, as a fit that does not chunk lists them
    (augmented copies are stored as they are batched, by size)."""
    keys, _ = store_photo_keys(store)
    canonical = np.array(sorted(range(len(keys)), key=lambda i: (keys[i][0], keys[i][1], i)), dtype=np.int32)
    origins = np.array(bank.origins, dtype=np.int32)
    origins[:, 0] = canonical[origins[:, 0]]
    images = training_records(store.image_names, store.image_sizes, store.image_views)
    return replace(bank, origins=origins, images=images)


def reduce_store(store, settings: CoresetSettings, chunking: Chunking, reference_patches: int,
                 threads: int = 1) -> list[ChunkCoreset]:
    """Every chunk of a whole fit's store, reduced one after another (the local chunked fit)."""
    keys, photos = store_photo_keys(store)
    plan = ChunkPlan.for_photos(photos, first_photo_rows(store, keys), chunking)
    present = sorted({position // plan.photos_per_chunk for position, _ in keys})
    return [reduce_chunk(store, keys, chunk, plan, settings, chunking, reference_patches, threads) for chunk in present]

