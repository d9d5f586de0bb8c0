"""Training patch features kept on disk while a model is fitted, so that memory stays bounded.

Every training patch's feature vector is appended, as float16, to an anonymous temporary file:
it has no name in the file system, so the operating system reclaims it when the file is closed
or the process ends in any way (Ctrl-C, SIGTERM, even SIGKILL); nothing can be left behind.
The coreset selection reads it back in contiguous chunks. Beside each vector the store keeps
where it came from: the training image (its position in ``image_names``) and the patch's row and
column on that image's grid, which is what evidence for a verdict points to.
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

from .scratch import warn_if_ram_backed

#: Rows read back at a time when gathering scattered rows.
READ_CHUNK = 65536


class PatchStore:
    """An append-only matrix of patch features (float16 on disk) with their origins.

    ``directory``: where the file goes (``None``: the temporary directory, ``TMPDIR``). A
    RAM-backed one (a tmpfs such as ``/dev/shm``, or ``/tmp`` on many systems) is warned about
    once (:class:`~patchcore.engine.scratch.RamBackedScratchWarning`): the store would take memory.
    """

    def __init__(self, width: int, directory: str | os.PathLike | None = None, dtype=np.float16) -> None:
        self.width = width
        self.dtype = np.dtype(dtype)
        warn_if_ram_backed(directory, "the training patches kept while fitting", stacklevel=2)
        self._file = tempfile.TemporaryFile(dir=directory, prefix="patchcore-patches-")
        self._lock = threading.Lock()  # the file position, where os.pread is missing (Windows)
        self._rows = 0
        self._starts: list[int] = []  # first row of each image
        self._columns: list[int] = []  # grid columns of each image
        self.image_names: list[str] = []
        # What a fit records beside the patches (:meth:`PatchCore.extract_patches`): each image's
        # photo size, copy (view), and (photo position, copy) key; the number of photos given.
        self.image_sizes: list = []
        self.image_views: list = []
        self.image_keys: list[tuple[int, int]] = []
        self.photo_count = 0

    def __enter__(self) -> "PatchStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        return self._rows * self.width * self.dtype.itemsize

    def append_image(self, name: str, grid: np.ndarray) -> None:
        """Add one image's patch features, ``grid`` of shape (rows, cols, width)."""
        rows, cols, width = grid.shape
        if width != self.width:
            raise ValueError(f"patch features are {width} wide, the store holds {self.width}")
        data = np.ascontiguousarray(grid.reshape(-1, width), dtype=self.dtype).tobytes()
        with self._lock:
            self._file.seek(self._rows * self.width * self.dtype.itemsize)
            self._file.write(data)
        self._starts.append(self._rows)
        self._columns.append(cols)
        self.image_names.append(name)
        self._rows += rows * cols

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32."""
        start, stop = max(0, start), min(stop, self._rows)
        if stop <= start:
            return np.empty((0, self.width), np.float32)
        size = self.dtype.itemsize
        data = self._read_bytes(start * self.width * size, (stop - start) * self.width * size)
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, self.width).astype(np.float32)

    def _read_bytes(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``: by ``os.pread`` (no shared file position, so threads
        may read at once), or, where it is missing (Windows), by seek and read under the lock."""
        with self._lock:
            self._file.flush()
            if not hasattr(os, "pread"):
                self._file.seek(offset)
                return self._file.read(length)
        return _pread_fully(self._file.fileno(), offset, length)

    def image_grid(self, image: int) -> np.ndarray:
        """Image ``image``'s patch features as stored, ``(rows, columns, width)`` float32."""
        start, stop = self.image_rows(image)
        return self.read(start, stop).reshape(-1, self._columns[image], self.width)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (any order) as float32, read in one pass over the file."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.width), np.float32)
        sorted_rows = rows[order]
        for start in range(0, self._rows, READ_CHUNK):
            lo, hi = np.searchsorted(sorted_rows, [start, start + READ_CHUNK])
            if hi > lo:
                out[order[lo:hi]] = self.read(start, start + READ_CHUNK)[sorted_rows[lo:hi] - start]
        return out

    def image_rows(self, image: int) -> tuple[int, int]:
        """The rows ``(start, stop)`` of the ``image``-th image appended."""
        stop = self._starts[image + 1] if image + 1 < len(self._starts) else self._rows
        return self._starts[image], stop

    def origins(self, rows: np.ndarray) -> np.ndarray:
        """``(image index, row, column)`` of the given rows, int32."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.asarray(self._starts, dtype=np.int64)
        image = np.searchsorted(starts, rows, side="right") - 1
        row, column = np.divmod(rows - starts[image], np.asarray(self._columns, dtype=np.int64)[image])
        return np.column_stack([image, row, column]).astype(np.int32)


def _pread_fully(descriptor: int, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` by as many ``os.pread`` calls as it takes (one call returns
    at most about 2 GiB on Linux)."""
    parts, done = [], 0
    while done < length:
        part = os.pread(descriptor, length - done, offset + done)
        if not part:
            raise OSError(f"patch store: the file ended after {offset + done} bytes, {length - done} short")
        parts.append(part)
        done += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class ArrayRows:
    """A feature matrix in memory, with the reading interface of :class:`PatchStore`."""

    def __init__(self, features: np.ndarray) -> None:
        self.features = features
        self.width = features.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.features[start:stop], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.features[np.asarray(rows, dtype=np.int64)], dtype=np.float32)
