"""Exact nearest-neighbour search in the memory bank (faiss ``IndexFlatL2``)."""

from __future__ import annotations

import faiss
import numpy as np


class MemoryBankIndex:
    """Exact L2 search over the memory bank; distances are returned as L2, not squared."""

    def __init__(self, memory_bank: np.ndarray) -> None:
        if memory_bank.ndim != 2 or memory_bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty 2-D array, got shape {memory_bank.shape}")
        self.memory_bank = np.ascontiguousarray(memory_bank, dtype=np.float32)
        self.index = faiss.IndexFlatL2(self.memory_bank.shape[1])
        self.index.add(self.memory_bank)

    @property
    def size(self) -> int:
        return self.memory_bank.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Distances ``(n, k)`` and bank indices ``(n, k)`` of the ``k`` nearest bank vectors."""
        squared, indices = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.size))
        return np.sqrt(np.maximum(squared, 0.0)), indices
