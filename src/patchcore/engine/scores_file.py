"""``scores.csv``: one row per image, the same columns for every way of scoring.

Columns: ``path, score, is_anomalous, error, model_sha256``. ``score`` is empty and ``error`` says
why for an image that could not be read; ``is_anomalous`` is empty when the model has no threshold,
else ``0`` or ``1``; ``model_sha256`` (:func:`~patchcore.engine.persistence.model_sha256`) names the
exact model version that wrote the row. Every row is flushed as it is written, so a run that stops
keeps every finished row.

:meth:`ScoresFile.start` begins a new file. :meth:`ScoresFile.resume` continues one: images with a
score are done; rows with an error are dropped and those images scored again; a last line cut off
by a run killed mid-write is dropped; a file of another model (or one without ``model_sha256``) is
refused, so one file never mixes two models' scores. Dropping rows rewrites the file atomically
(a temporary file, then :func:`os.replace`).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterable, TextIO

from ..errors import PatchCoreError
from .atomic_files import atomic_path

COLUMNS = ("path", "score", "is_anomalous", "error", "model_sha256")


class ScoresFileError(PatchCoreError, ValueError):
    """An existing ``scores.csv`` cannot be continued (another model's, an older format, damaged)."""


class ScoresFile:
    """Writes the rows of one ``scores.csv`` for one model; open it with :meth:`start` or :meth:`resume`.

    ``done`` holds the paths that already have a score (from an earlier run, when resumed).
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Path, model_sha256: str, handle: TextIO, done: frozenset[str]) -> None:
        self.path = path
        self.model_sha256 = model_sha256
        self.done = done
        self._handle = handle
        self._writer = csv.writer(handle, lineterminator="\n")

    @classmethod
    def start(cls, path: str | os.PathLike, model_sha256: str) -> ScoresFile:
        """A new, empty ``path`` (an existing file is replaced) for scores of model ``model_sha256``."""
        path = Path(path)
        handle = open(path, "w", newline="", encoding="utf-8")
        scores = cls(path, model_sha256, handle, frozenset())
        scores._write(COLUMNS)
        return scores

    @classmethod
    def resume(cls, path: str | os.PathLike, model_sha256: str, retry: Iterable[str], model_name: str = "") -> ScoresFile:
        """Continue ``path`` (or start it when absent) with scores of model ``model_sha256``.

        The rows with an error of the paths in ``retry`` (the images this run will score) are
        dropped, as is a cut-off last line; those images are not in ``done``. ``model_name`` (the
        model's folder, say) only makes the error messages clearer. Raises
        :class:`ScoresFileError` for a file of another model, without ``model_sha256``, or damaged.
        """
        path = Path(path)
        if not path.is_file():
            return cls.start(path, model_sha256)
        rows, cut_off = _read_rows(path)
        if not rows:  # nothing whole in it, not even the header
            return cls.start(path, model_sha256)
        asked = f"{model_sha256} ({model_name})" if model_name else model_sha256
        _check_header(path, rows[0], asked)
        body = rows[1:]
        _check_rows(path, body, model_sha256, asked)
        retry = set(retry)
        kept = [row for row in body if not (row[3] and row[0] in retry)]
        if cut_off or len(kept) < len(body):
            _replace(path, [list(COLUMNS), *kept])
        done = frozenset(row[0] for row in kept if not row[3] and row[1])
        return cls(path, model_sha256, open(path, "a", newline="", encoding="utf-8"), done)

    def add(self, path: str, score: float, is_anomalous: bool | None) -> None:
        """The row of a scored image (``is_anomalous`` None: the model has no threshold)."""
        verdict = "" if is_anomalous is None else int(bool(is_anomalous))
        self._write((path, f"{score:.6f}", verdict, "", self.model_sha256))

    def add_failure(self, path: str, error: str) -> None:
        """The row of an image that could not be scored, and why."""
        self._write((path, "", "", error or "not scored", self.model_sha256))

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> ScoresFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _write(self, row: Iterable) -> None:
        self._writer.writerow(row)
        self._handle.flush()  # an interrupted run keeps every finished row


def _read_rows(path: Path) -> tuple[list[list[str]], bool]:
    """The whole records of ``path`` (blank lines left out), and whether a cut-off last one was dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ScoresFileError(f"{path}: not a scores file (not UTF-8 text: {error}); use another output folder") from None
    rows = [row for row in csv.reader(io.StringIO(text, newline=""))]
    # A run killed mid-write leaves a last record without its line end, or inside a quoted path.
    cut_off = bool(rows) and (not text.endswith("\n") or len(rows[-1]) != len(COLUMNS))
    if cut_off:
        rows.pop()
    return [row for row in rows if row], cut_off


def _check_header(path: Path, header: list[str], asked: str) -> None:
    if "model_sha256" not in header:
        raise ScoresFileError(
            f"{path}: written by an older patchcore, its rows do not say which model scored them (no model_sha256 "
            f"column); the model asked for is {asked}; use another output folder for its scores")
    if tuple(header) != COLUMNS:
        raise ScoresFileError(f"{path}: unexpected columns {', '.join(header)} (expected {', '.join(COLUMNS)}); "
                              "use another output folder")


def _check_rows(path: Path, rows: list[list[str]], model_sha256: str, asked: str) -> None:
    for line, row in enumerate(rows, 2):
        if len(row) != len(COLUMNS):
            raise ScoresFileError(f"{path}, row {line}: {len(row)} fields instead of {len(COLUMNS)} "
                                  f"({', '.join(COLUMNS)}); the file is damaged; use another output folder")
        if row[4] != model_sha256:
            raise ScoresFileError(
                f"{path}: holds scores of another model (model_sha256 {row[4] or 'empty'}); the model asked for is "
                f"{asked}; one file never mixes two models' scores, so use another output folder for this model")


def _replace(path: Path, rows: list[list[str]]) -> None:
    """Rewrite ``path`` with ``rows`` in one step: a crash leaves the old file or the new one, whole."""
    with atomic_path(path, durable=True) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
