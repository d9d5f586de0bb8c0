"""Approximate nearest-neighbour search in the memory bank (paper, section 4.4.2: faiss IVF-PQ).

:class:`ApproximateIndex` has the interface of :class:`patchcore.engine.search.MemoryBankIndex`
(``.search(queries, k)`` -> (L2 distances, indices), ``.size``, ``.memory_bank``) so that it can
replace the exact index in a fitted model (``search_backend="hnsw"`` or ``"ivfpq"``, and
``"auto"`` above :data:`patchcore.engine.detector.AUTO_EXACT_LIMIT` bank vectors).

Kinds:

- ``"hnsw"``: ``faiss.IndexHNSWSQ`` with float16 vectors (graph search); the neighbours it finds
  are measured in float32, so their distances are true L2 distances.
- ``"ivfpq"``: ``faiss.IndexIVFPQ`` as in the paper (inverted lists + product quantisation; the
  distances are the quantised ones). Its training needs enough vectors: the number of lists and
  the code size shrink for small banks, and a bank too small to train on (under 64 vectors) falls
  back to an exact ``IndexFlatL2``, recorded in ``.description``. By default (``refine=4``) the
  ``4 k`` best PQ candidates are re-ranked with exact distances (``faiss.IndexRefineFlat``), so the
  returned distances are true L2 distances of (nearly always) the true neighbours; ``refine=0``
  returns the raw PQ distances, as the paper's implementation.
"""

from __future__ import annotations

import math

import numpy as np

from .search import exact_distances

KINDS = ("hnsw", "ivfpq")


def _pq_subquantizers(dim: int, target: int) -> int:
    """The largest divisor of ``dim`` not above ``target`` (faiss needs ``dim % m == 0``)."""
    for m in range(min(target, dim), 0, -1):
        if dim % m == 0:
            return m
    return 1


#: HNSW's links per vector (M) and search breadth (efSearch). Measured on the test photos of
#: macaroni1 (lite2, shorter side 384: 3,456 patches against 31,104 bank vectors) and bottle
#: (2,304 against 4,816), one thread, after the exact re-check of the highest patches (image
#: scores equal exact search's either way): M=16/ef=16 searches a macaroni1 photo in 25 ms and a
#: bottle photo in 9 ms against 60 and 21 ms for the former M=32/ef=32, finds the exact nearest
#: neighbour of 99.87% / 99.53% of patches (99.99% / 99.90% before) and leaves pixel AUROC and
#: AUPRO within 0.01 point of exact search (macaroni1 99.48 / 95.18, exact 99.48 / 95.19).
#: ef=8 would save another 7 ms on macaroni1 for 98.8% of exact neighbours and AUPRO -0.04.
HNSW_NEIGHBOURS = 16
HNSW_EF_SEARCH = 16


class ApproximateIndex:
    """Approximate L2 k-nearest-neighbour search over the rows of ``memory_bank`` (faiss)."""

    def __init__(
        self,
        memory_bank: np.ndarray,
        kind: str = "ivfpq",
        *,
        hnsw_neighbours: int = HNSW_NEIGHBOURS,
        ef_search: int = HNSW_EF_SEARCH,
        nprobe: int = 8,
        refine: int = 4,
        seed: int = 0,
    ) -> None:
        import faiss

        if memory_bank.ndim != 2 or memory_bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty 2-D array, got shape {memory_bank.shape}")
        if kind not in KINDS:
            raise ValueError(f"unknown approximate index {kind!r}: use one of {', '.join(KINDS)}")
        self.memory_bank = np.ascontiguousarray(memory_bank, dtype=np.float32)
        self.kind = kind
        n, dim = self.memory_bank.shape
        if kind == "hnsw":
            # The graph walks float16 copies of the vectors (half the memory to read per step);
            # the neighbours it ends at are then measured in float32 (:meth:`search`).
            index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, hnsw_neighbours)
            index.train(self.memory_bank)
            index.hnsw.efSearch = ef_search
            index.add(self.memory_bank)
            self.description = f"HNSW M={hnsw_neighbours} efSearch={ef_search} (float16 walk, float32 distances)"
        elif n < 64:
            index = faiss.IndexFlatL2(dim)
            index.add(self.memory_bank)
            self.description = f"exact (bank of {n} too small for IVF-PQ)"
        else:
            # Lists: about 4 sqrt(N), with at least ~39 training vectors per list.
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
            # Sub-quantiser codebooks: 2^nbits centroids need training vectors too.
            nbits = 8 if n >= 256 * 39 else max(4, min(8, int(math.log2(max(n // 39, 16)))))
            m = _pq_subquantizers(dim, max(1, dim // 4))
            quantizer = faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits)
            index.cp.seed = seed
            index.pq.cp.seed = seed
            index.train(self.memory_bank)
            index.nprobe = min(nprobe, nlist)
            self._quantizer = quantizer  # keep it alive as long as the index
            self.description = f"IVF-PQ nlist={nlist} m={m} nbits={nbits} nprobe={index.nprobe}"
            if refine:
                # Re-rank refine * k PQ candidates with exact distances (faiss IndexRefineFlat):
                # PQ distances carry the quantisation error, which would shift every patch score.
                self._ivfpq = index
                index = faiss.IndexRefineFlat(index)
                index.k_factor = float(refine)
                self.description += f", exact re-ranking of {refine}k candidates"
            index.add(self.memory_bank)
        self._index = index

    @property
    def size(self) -> int:
        return self.memory_bank.shape[0]

    def neighbours(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Bank indices ``(n, k)`` of (about) the ``k`` nearest bank vectors, and faiss's squared
        distances to them (float16 or product-quantised ones where the index stores those)."""
        k = min(k, self.size)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        squared, indices = self._index.search(queries, k)
        missing = indices < 0  # IVF may find fewer than k vectors in the probed lists
        if missing.any():
            indices = np.where(missing, indices[:, :1].clip(min=0), indices)
            fill = np.linalg.norm(self.memory_bank[indices] - queries[:, None, :], axis=2) ** 2
            squared = np.where(missing, fill, squared)
        return indices, squared

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Distances ``(n, k)`` and bank indices ``(n, k)`` of (about) the ``k`` nearest bank vectors.

        HNSW's neighbours are measured in float32 (true L2 distances, nearest first); IVF-PQ's
        distances are faiss's (true ones after its exact re-ranking, the default).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        indices, squared = self.neighbours(queries, k)
        if self.kind != "hnsw":
            return np.sqrt(np.maximum(squared, 0.0)), indices
        distances = exact_distances(queries, self.memory_bank, indices)
        order = np.argsort(distances, axis=1, kind="stable")
        return np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)
