"""Exact nearest-neighbour search in the memory bank.

Two exact L2 back ends give the same neighbours (up to float rounding of ties):

- ``"numpy"`` (default): matrix products ``|b|^2 - 2 q.b`` with numpy's BLAS, a block of query
  rows at a time against the whole bank (one product and one in-place addition per block, then
  each row's nearest), on vectors centred on the bank's mean (which keeps the expanded form
  precise). On an earlier reference CPU (Xeon) it was 4-5x faster than faiss for PatchCore's
  shapes, whose bundled OpenBLAS did not recognise the CPU; on the 2-core AMD EPYC of issue 17
  both take 33 ms for a bottle photo (2,304 queries, 4,816 vectors of 168 values, one thread),
  1.3x faster than the previous blocking by bank columns. It needs no torch, so the exported
  runtime searches the same way. (Model files written before
  version 0.3 may call it ``"torch"``; :func:`~patchcore.engine.settings.read_settings` renames it.)
- ``"faiss"``: ``faiss.IndexFlatL2``, the paper's choice.

Distances are returned as L2, not squared.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from threadpoolctl import ThreadpoolController

from .cpus import available_cpus

BACKENDS = ("numpy", "faiss")
#: Distances computed per block of query rows (floats, 8 MB): a block stays in the cache for the
#: pass that picks each row's neighbours; 16-256 rows, so that each product is large enough to
#: run at full speed (at 16 rows, 31,104 bank vectors, a block's product reads the bank for little
#: work: 64 queries took 10.4 ms against 7.0 ms at 64 rows).
BLOCK_VALUES = 1 << 21
BLOCK_ROWS = (16, 256)
_TICKS = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


class MemoryBankIndex:
    """Exact L2 k-nearest-neighbour search over the rows of ``memory_bank``."""

    def __init__(self, memory_bank: np.ndarray, backend: str = "numpy", block_size: int | None = None) -> None:
        if memory_bank.ndim != 2 or memory_bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty 2-D array, got shape {memory_bank.shape}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.memory_bank = np.ascontiguousarray(memory_bank, dtype=np.float32)
        self.backend = backend
        #: Query rows per matrix product (:data:`BLOCK_VALUES`).
        self.block_size = block_size or int(np.clip(BLOCK_VALUES // self.size, *BLOCK_ROWS))
        if backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatL2(self.memory_bank.shape[1])
            self._faiss.add(self.memory_bank)
        else:
            self._centre = self.memory_bank.mean(axis=0, dtype=np.float64).astype(np.float32)
            self._bank_centred = self.memory_bank - self._centre
            # -2 b^T (exact: a power of two), so that one product and one addition give |b|^2 - 2 q.b.
            self._bank_t_minus_2 = np.ascontiguousarray(-2.0 * self._bank_centred.T)
            self._bank_norms = np.einsum("ij,ij->i", self._bank_centred, self._bank_centred)

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
        return self._exact_search(queries - self._centre, k)

    def _exact_search(self, queries: np.ndarray, k: int,
                      excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The numpy back end's search of centred ``queries``, never answering rows ``excluded``."""
        nearest = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.block_size):
            stop = min(start + self.block_size, len(queries))
            # |q - b|^2 - |q|^2 = |b|^2 - 2 q.b ; |q|^2 is the same for every b of a row.
            partial = queries[start:stop] @ self._bank_t_minus_2
            partial += self._bank_norms
            if excluded is not None:
                partial[:, excluded] = np.inf
            if k == 1:
                nearest[start:stop, 0] = partial.argmin(axis=1)
            else:
                nearest[start:stop] = np.argpartition(partial, k - 1, axis=1)[:, :k]
        # The expanded form chose the neighbours; their distances are measured directly, which is
        # more precise and independent of how queries are blocked (a patch re-checked on its own
        # gets the same score, to the bit, as in a whole image's search).
        distances = exact_distances(queries, self._bank_centred, nearest)
        if k > 1:  # nearest first, by the direct distances
            order = np.argsort(distances, axis=1, kind="stable")
            distances, nearest = np.take_along_axis(distances, order, 1), np.take_along_axis(nearest, order, 1)
        return distances, nearest

    def search_excluding(self, queries: np.ndarray, excluded: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`search`, in the bank without the rows ``excluded`` (bank indices): what a bank
        that never held them would answer, exactly (leave-one-photo-out scores of a training
        photo). Computed as the numpy back end's search, the excluded columns of each block's
        distances set to infinity; at least one row must remain."""
        excluded = np.unique(np.asarray(excluded, dtype=np.int64))
        k = min(k, self.size - len(excluded))
        if k < 1:
            raise ValueError("every bank vector is excluded: nothing to search")
        if self.backend != "numpy":
            if not hasattr(self, "_numpy_twin"):
                self._numpy_twin = MemoryBankIndex(self.memory_bank, "numpy", self.block_size)
            return self._numpy_twin.search_excluding(queries, excluded, k)
        return self._exact_search(np.ascontiguousarray(queries, dtype=np.float32) - self._centre, k, excluded)

    def distances(self, queries: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """L2 distances ``(n, k)`` of the queries to the bank vectors ``indices`` ``(n, k)``, measured
        as :meth:`search` measures its neighbours' (the same values, to the bit)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.backend == "faiss":
            return exact_distances(queries, self.memory_bank, indices)
        return exact_distances(queries - self._centre, self._bank_centred, indices)


def exact_distances(queries: np.ndarray, bank: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """L2 distances ``(n, k)`` of each query ``(n, D)`` to the bank rows ``indices`` ``(n, k)``,
    measured directly (no expanded form), float32."""
    differences = queries[:, None, :] - bank[indices]
    return np.sqrt(np.einsum("ijk,ijk->ij", differences, differences))


def busy_seconds(cpus: set[int] | None = None) -> float | None:
    """CPU seconds the cores ``cpus`` (default: those this process may run on) have spent busy
    since boot, from ``/proc/stat``; None where there is no such file."""
    if cpus is None:
        cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu") and not line.startswith("cpu ")]
    except OSError:
        return None
    busy = 0
    for fields in lines:
        if cpus is None or int(fields[0][3:]) in cpus:
            values = [int(v) for v in fields[1:9]]
            busy += sum(values) - values[3] - values[4]  # all but idle and iowait
    return busy / _TICKS


class IdleCores:
    """How many of this process's cores other processes left idle since the previous look: the
    threads that search and maps may use next.

    Both parallelise well on idle cores, but beside busy processes every split step waits for a
    thread that is not scheduled: on the 2-core machine of issue 17, beside other developers'
    tests, two threads made a bottle photo's search 1-4x slower than one (10-11 ms) and its map
    3-15x slower (0.7-1 ms). The cores' busy time (:func:`busy_seconds`) less this process's own
    CPU time, over the time since the previous look (at least :data:`WINDOW` seconds, else the
    previous answer), is what others used; the rest is free. A look reads one file, it does not wait.
    """

    #: Shortest time over which busy time is measured (the kernel counts in 10 ms ticks).
    WINDOW = 0.05

    def __init__(self) -> None:
        self._last: tuple[float, float, float] | None = None  # wall, busy, own CPU (seconds)
        self._answer = 1

    def free(self, limit: int | None = None) -> int:
        """Idle cores: at least one, at most ``limit`` and the cores this process may use. The
        first look has nothing to compare with: one."""
        cores = available_cpus()
        busy = busy_seconds()
        if busy is None:
            return min(limit or cores, cores)
        now = (time.monotonic(), busy, time.process_time())
        last = self._last
        if last is not None and now[0] - last[0] < self.WINDOW:
            return min(self._answer, limit or cores)  # too short to tell: measure from the earlier look
        self._last = now
        if last is not None:
            others = max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])
            self._answer = max(1, min(cores, int(cores - others + 0.25)))
        return min(self._answer, limit or cores)


#: The idle cores that this process's searches may use.
IDLE_CORES = IdleCores()
_controller: ThreadpoolController | None = None
#: How many modules were imported when the controller looked for thread pools: a module imported
#: since (faiss brings its own OpenBLAS) may have loaded a library it does not know.
_controller_modules = -1
_controller_lock = threading.Lock()


@contextmanager
def search_threads(count: int) -> Iterator[None]:
    """numpy's BLAS (process-wide) and faiss's OpenMP (this thread) run ``count`` threads inside."""
    global _controller, _controller_modules
    with _controller_lock:
        if _controller is None or _controller_modules != len(sys.modules):
            _controller_modules = len(sys.modules)
            _controller = ThreadpoolController()
    faiss = sys.modules.get("faiss")
    before = faiss.omp_get_max_threads() if faiss is not None else None
    if faiss is not None:
        faiss.omp_set_num_threads(count)
    try:
        with _controller.limit(limits=count, user_api="blas"):
            yield
    finally:
        if faiss is not None:
            faiss.omp_set_num_threads(before)
