"""Approximate nearest-neighbour search in the memory bank (paper, section 4.4.2: faiss IVF-PQ).

:class:`ApproximateIndex` has the interface of :class:`patchcore.engine.search.MemoryBankIndex`
(``.search(queries, k)`` -> (L2 distances, indices), ``.size``, ``.memory_bank``) so that it can
replace the exact index in a fitted model (``search_backend="hnsw"`` or ``"ivfpq"``, and
``"auto"`` above :data:`patchcore.engine.detector.AUTO_EXACT_LIMIT` bank vectors).

Kinds:

- ``"hnsw"``: ``faiss.IndexHNSWFlat`` (graph search, exact distances to the vectors it visits).
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

KINDS = ("hnsw", "ivfpq")


def _pq_subquantizers(dim: int, target: int) -> int:
    """The largest divisor of ``dim`` not above ``target`` (faiss needs ``dim % m == 0``)."""
    for m in range(min(target, dim), 0, -1):
        if dim % m == 0:
            return m
    return 1


#: HNSW's search breadth. 32 found the exact nearest neighbour for 99.9% of patches on macaroni1
#: (lite2, shorter side 384, 31,104 bank vectors) with the same AUROC and AUPRO as 64, searching
#: 1.3x faster per photo (docs/experiments.md); the image score's top patches are re-checked exactly.
HNSW_EF_SEARCH = 32


class ApproximateIndex:
    """Approximate L2 k-nearest-neighbour search over the rows of ``memory_bank`` (faiss)."""

    def __init__(
        self,
        memory_bank: np.ndarray,
        kind: str = "ivfpq",
        *,
        hnsw_neighbours: int = 32,
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
            index = faiss.IndexHNSWFlat(dim, hnsw_neighbours)
            index.hnsw.efSearch = ef_search
            index.add(self.memory_bank)
            self.description = f"HNSW M={hnsw_neighbours} efSearch={ef_search}"
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

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Distances ``(n, k)`` and bank indices ``(n, k)`` of (about) the ``k`` nearest bank vectors."""
        k = min(k, self.size)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        squared, indices = self._index.search(queries, k)
        missing = indices < 0  # IVF may find fewer than k vectors in the probed lists
        if missing.any():
            indices = np.where(missing, indices[:, :1].clip(min=0), indices)
            fill = np.linalg.norm(self.memory_bank[indices] - queries[:, None, :], axis=2) ** 2
            squared = np.where(missing, fill, squared)
        return np.sqrt(np.maximum(squared, 0.0)), indices
