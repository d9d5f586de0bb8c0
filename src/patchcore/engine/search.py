"""Exact nearest-neighbour search in the memory bank.

Two exact L2 back ends give the same neighbours (up to float rounding of ties):

- ``"torch"`` (default): blocked matrix products ``|b|^2 - 2 q.b`` and a running minimum. On this
  project's reference CPU it was 4-5x faster than faiss for PatchCore's shapes (784 queries, a
  bank of 10^3-10^5 vectors of 152-1024 dims): the faiss-cpu wheel's bundled OpenBLAS does not
  recognise recent Xeons and its top-1 pass dominates (see ``benchmarks/bench_search.py``).
- ``"faiss"``: ``faiss.IndexFlatL2``, the paper's choice.

Distances are returned as L2, not squared.
"""

from __future__ import annotations

import numpy as np
import torch

BACKENDS = ("torch", "faiss")


class MemoryBankIndex:
    """Exact L2 k-nearest-neighbour search over the rows of ``memory_bank``."""

    def __init__(self, memory_bank: np.ndarray, backend: str = "torch", block_size: int = 4096) -> None:
        if memory_bank.ndim != 2 or memory_bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty 2-D array, got shape {memory_bank.shape}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.memory_bank = np.ascontiguousarray(memory_bank, dtype=np.float32)
        self.backend = backend
        self.block_size = block_size
        if backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatL2(self.memory_bank.shape[1])
            self._faiss.add(self.memory_bank)
        else:
            # Centred on the bank's mean: distances are unchanged, but |q|^2 and |b|^2 shrink to the
            # scale of the distances themselves, so the expanded form below keeps its precision.
            self._centre = torch.from_numpy(self.memory_bank.mean(axis=0, dtype=np.float64).astype(np.float32))
            bank = torch.from_numpy(self.memory_bank) - self._centre
            self._bank_t = bank.T.contiguous()  # (D, N): each block is a contiguous column slice
            self._bank_norms = (bank * bank).sum(dim=1)

    @property
    def size(self) -> int:
        return self.memory_bank.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Distances ``(n, k)`` and bank indices ``(n, k)`` of the ``k`` nearest bank vectors."""
        k = min(k, self.size)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.backend == "faiss":
            squared, indices = self._faiss.search(queries, k)
            return np.sqrt(np.maximum(squared, 0.0)), indices
        return self._torch_search(torch.from_numpy(queries) - self._centre, k)

    def _torch_search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        best_values = best_indices = None
        with torch.inference_mode():
            for start in range(0, self.size, self.block_size):
                stop = min(start + self.block_size, self.size)
                # |q - b|^2 - |q|^2 = |b|^2 - 2 q.b ; |q|^2 is added once at the end.
                partial = torch.addmm(self._bank_norms[start:stop][None, :], queries, self._bank_t[:, start:stop], alpha=-2.0)
                if k == 1:
                    values, indices = partial.min(dim=1, keepdim=True)
                else:
                    values, indices = partial.topk(min(k, stop - start), dim=1, largest=False)
                indices = indices + start
                if best_values is None:
                    best_values, best_indices = values, indices
                elif k == 1:
                    closer = values < best_values
                    best_values = torch.where(closer, values, best_values)
                    best_indices = torch.where(closer, indices, best_indices)
                else:
                    merged_values = torch.cat([best_values, values], dim=1)
                    merged_indices = torch.cat([best_indices, indices], dim=1)
                    best_values, order = merged_values.topk(k, dim=1, largest=False)
                    best_indices = merged_indices.gather(1, order)
            squared = best_values + (queries * queries).sum(dim=1, keepdim=True)
            return torch.sqrt(squared.clamp_min(0.0)).numpy(), best_indices.numpy()
