"""Recording verdicts beside scoring: a thread of its own commits them, in groups.

Scoring hands each inspection to :meth:`HistoryWriter.put` and goes on at once; the writer
commits whatever has queued meanwhile in one transaction (usually the one photo scored while
the last commit ran), then runs each inspection's ``after_commit`` (``watch`` moves the photo
then, so that a photo leaves the inbox only once its verdict is safe). A commit that fails is
tried again a few times (a PostgreSQL server restarting); when it keeps failing the writer
stops, and the next :meth:`put` raises the error. A crash loses only what is queued and not
yet committed: those photos are still in the inbox, and are scored again on restart.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy.exc import DBAPIError

from .history import History, HistoryError
from .schema import Inspection

logger = logging.getLogger("patchcore.station")

#: Inspections committed together at most.
MAX_GROUP = 64
#: Inspections that may wait for the writer; more block the scorer (the database is down or slow).
MAX_QUEUE = 256
#: Tries of a failing commit, and the pause before the first retry (doubled each time).
TRIES = 5
RETRY_PAUSE = 0.2

AfterCommit = Callable[[Inspection], None]


@dataclass
class _Item:
    inspection: Inspection | None
    after_commit: AfterCommit | None = None
    done: threading.Event | None = None  # a flush marker


class HistoryWriter:
    """Commits inspections to ``history`` from a daemon thread; use as a context manager (or
    call :meth:`close`). ``on_problem(message)`` hears of an ``after_commit`` that failed and of
    inspections refused as already recorded (another station took the same photo)."""

    def __init__(self, history: History, on_problem: Callable[[str], None] | None = None,
                 max_group: int = MAX_GROUP, max_queue: int = MAX_QUEUE) -> None:
        self.history = history
        self.on_problem = on_problem or (lambda message: logger.warning("%s", message))
        self.max_group = max_group
        self._queue: queue.Queue[_Item] = queue.Queue(max_queue)
        self.error: BaseException | None = None
        #: Inspections committed, commits made, and seconds spent in them.
        self.committed = 0
        self.commits = 0
        self.commit_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="patchcore-history-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, inspection: Inspection, after_commit: AfterCommit | None = None) -> None:
        """Queue ``inspection`` for the next commit; raises :class:`HistoryError` once the writer failed."""
        self._raise_if_failed()
        if not self._thread.is_alive():
            raise HistoryError(f"{self.history.name}: the history writer is closed")
        self._queue.put(_Item(inspection, after_commit))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed (and its ``after_commit`` run);
        ``False`` if ``timeout`` passed first. Raises :class:`HistoryError` if the writer failed."""
        self._raise_if_failed()
        marker = threading.Event()
        self._queue.put(_Item(None, done=marker))
        while not marker.wait(0.05):
            if self.error is not None or not self._thread.is_alive():
                self._raise_if_failed()
            if timeout is not None:
                timeout -= 0.05
                if timeout <= 0:
                    return False
        return True

    def close(self) -> None:
        """Commit what is queued and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_Item(None))
            self._thread.join()

    @property
    def ms_per_inspection(self) -> float:
        return 1000.0 * self.commit_seconds / max(1, self.committed)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise HistoryError(f"{self.history.name}: the history database stopped taking verdicts: {self.error}")

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            group, markers, stop = self._next_group()
            if group and self.error is None:
                try:
                    self._commit(group)
                except Exception as error:  # reported to the scorer by put() and flush()
                    self.error = error
            for marker in markers:
                marker.set()
            if stop:
                return

    def _next_group(self) -> tuple[list[_Item], list[threading.Event], bool]:
        """The items queued now (waiting for the first), up to a flush marker or the stop."""
        group: list[_Item] = []
        markers: list[threading.Event] = []
        item = self._queue.get()
        while True:
            if item.done is not None:
                markers.append(item.done)
                return group, markers, False
            if item.inspection is None:
                return group, markers, True
            group.append(item)
            if len(group) >= self.max_group:
                return group, markers, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return group, markers, False

    def _commit(self, group: list[_Item]) -> None:
        started = time.perf_counter()
        recorded = self._record_with_retries(group)
        self.commit_seconds += time.perf_counter() - started
        self.commits += 1
        self.committed += len(recorded)
        for item in recorded:
            if item.after_commit is not None:
                try:
                    item.after_commit(item.inspection)
                except Exception as error:  # the verdict is safe; the photo stays where it is
                    self.on_problem(f"{item.inspection.photo_path}: recorded, but {error}")

    def _record_with_retries(self, group: list[_Item]) -> list[_Item]:
        pause = RETRY_PAUSE
        for attempt in range(TRIES):
            try:
                self.history.record([item.inspection for item in group])
                return group
            except HistoryError:  # one of them recorded already: record the others one by one
                return self._record_one_by_one(group)
            except DBAPIError as error:
                if attempt == TRIES - 1:
                    raise
                logger.warning("history database: commit failed (%s); trying again in %.1f s", error.orig, pause)
                time.sleep(pause)
                pause *= 2
        return []  # pragma: no cover - the loop returns or raises

    def _record_one_by_one(self, group: list[_Item]) -> list[_Item]:
        recorded = []
        for item in group:
            try:
                self.history.record([item.inspection])
            except HistoryError as error:
                self.on_problem(f"{item.inspection.photo_path}: not recorded: {error}")
                continue
            recorded.append(item)
        return recorded
