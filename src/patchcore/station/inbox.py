"""When a photo in the inbox is complete, and handing each one out once it is.

A camera (or a copy over a network share) writes a photo over time; scoring it half-written
would record a broken photo. A file is taken when either

* it was **renamed into the folder** (or from a name the inbox ignores, ``x.png.part`` or
  ``.x.png``, to an image name): the writer's way of saying it is done; or
* its size and modification time have **not changed for** ``settle`` seconds, and, for PNG and
  JPEG, the file **ends as those formats end** (PNG's ``IEND`` chunk, JPEG's end-of-image marker),
  so that a writer that stalls mid-file is waited for however long it stalls; or
* it has not changed for ``stale`` seconds, although it does not end so: a writer that died
  mid-file. It is taken then, and the decoder records what is wrong with it.

Changes are seen through watchdog's events (inotify and the like; ``poll=True``: by polling,
for network shares whose changes raise no events), and a rescan of the folder every ``rescan``
seconds catches anything an event queue dropped. Only files with an image suffix directly in
the folder count; hidden files (``.x.png``) are ignored. A file handed out is handed out again
only after it changes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..engine.images import IMAGE_SUFFIXES

#: Bytes at the end of a file searched for the format's end marker (JPEGs may carry padding after it).
TAIL_BYTES = 1024
PNG_END = b"IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"

#: (size, modification time in ns, inode): what changes while a file is written.
Stamp = tuple[int, int, int]


def is_candidate(path: Path) -> bool:
    """Whether a file of this name may be a photo to score (an image suffix, not hidden)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def ends_complete(path: Path) -> bool:
    """Whether the file ends as a whole file of its format does (always true for formats whose
    end is not marked: BMP, TIFF, WebP)."""
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        return True
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - TAIL_BYTES))
        tail = handle.read()
    if suffix == ".png":
        return tail.endswith(PNG_END)
    return JPEG_END in tail


def stamp(path: Path) -> Stamp | None:
    """The file's :data:`Stamp`, or ``None`` when it is gone or no regular file."""
    try:
        status = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    return status.st_size, status.st_mtime_ns, status.st_ino


class _QuietStop(logging.Filter):
    """Drops the error watchdog's inotify thread logs when stopped while an event is on its way
    (it is harmless: the event is for a watch that is ending)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in str(record.msg)


_QUIET_STOP = _QuietStop()


@dataclass
class Arrival:
    """A complete photo handed out: where, and when it was first seen and found complete
    (``time.monotonic()`` seconds)."""

    path: Path
    seen: float
    complete: float
    #: ``renamed``, ``settled`` or ``stale``: why it counts as complete.
    reason: str


@dataclass
class _Candidate:
    stamp: Stamp | None
    changed: float  # when the stamp last changed (monotonic)
    seen: float
    renamed: bool = False
    unfinished: bool = False  # reported as unchanged but not ending as a whole file


class Inbox:
    """The photos landing in ``folder``: :meth:`start`, then :meth:`take` them as they complete.

    ``on_notice(path, state)`` hears (from the watcher's or the caller's thread) of a file
    ``"seen"``: noticed new or changed, not yet complete; and ``"unfinished"``: unchanged for
    ``settle`` seconds but not ending as a whole file of its format, so waited for.
    """

    def __init__(self, folder: str | os.PathLike, *, settle: float = 1.0, stale: float = 30.0, poll: bool = False,
                 poll_interval: float = 1.0, rescan: float = 10.0,
                 on_notice: Callable[[Path, str], None] | None = None) -> None:
        self.folder = Path(folder).absolute()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: the inbox folder does not exist")
        if settle <= 0 or stale < settle:
            raise ValueError(f"settle must be positive and stale at least settle, got settle={settle}, stale={stale}")
        self.settle = settle
        self.stale = stale
        self.poll = poll
        self.poll_interval = poll_interval
        self.rescan_seconds = rescan
        self.on_notice = on_notice
        self._candidates: dict[Path, _Candidate] = {}
        #: Files handed out, with their stamp then: not handed out again unless it changes.
        self._handed: dict[Path, Stamp] = {}
        self._changed = threading.Condition()
        self._observer = None
        self._next_rescan = 0.0

    # -- watching ------------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the folder, and take in every photo already there (the backlog)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        inbox = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                inbox._on_event(event)

        logging.getLogger("watchdog.observers.inotify").addFilter(_QUIET_STOP)  # added once: filters are a set
        observer = PollingObserver(timeout=self.poll_interval) if self.poll else Observer()
        observer.schedule(Handler(), str(self.folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self.rescan()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=0.5)  # daemon threads: a slow poll never holds up a stop
            self._observer = None

    def _on_event(self, event) -> None:
        if event.is_directory:
            return
        kind = event.event_type
        if kind == "moved":
            self._gone(Path(os.fsdecode(event.src_path)))
            destination = Path(os.fsdecode(event.dest_path))
            if destination.parent == self.folder:
                self.note(destination, renamed=True)
        elif kind == "deleted":
            self._gone(Path(os.fsdecode(event.src_path)))
        elif kind in ("created", "modified", "closed"):
            path = Path(os.fsdecode(event.src_path))
            if path.parent == self.folder:
                self.note(path)

    def rescan(self) -> None:
        """Look at every file in the folder (events may have been dropped)."""
        self._next_rescan = time.monotonic() + self.rescan_seconds
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for entry in entries:
            self.note(Path(entry.path))

    def note(self, path: Path, renamed: bool = False) -> None:
        """A file may have appeared or changed (``renamed``: it was renamed into the folder)."""
        if not is_candidate(path):
            return
        current = stamp(path)
        if current is None:
            return
        now = time.monotonic()
        notify_seen = False
        with self._changed:
            if self._handed.get(path) == current and not renamed:
                return  # handed out already and unchanged since
            candidate = self._candidates.get(path)
            if candidate is None:
                candidate = self._candidates[path] = _Candidate(current, now, now, renamed)
                notify_seen = True
            elif candidate.stamp != current:  # written to since: whatever it was, it is being written now
                candidate.stamp, candidate.changed, candidate.renamed, candidate.unfinished = current, now, renamed, False
            else:
                candidate.renamed = candidate.renamed or renamed
            self._changed.notify_all()
        if notify_seen and self.on_notice is not None:
            self.on_notice(path, "seen")

    def _gone(self, path: Path) -> None:
        with self._changed:
            self._candidates.pop(path, None)
            self._handed.pop(path, None)

    def forget(self, path: Path) -> None:
        """The file left the inbox (moved by the station): stop tracking it."""
        self._gone(Path(path))

    # -- handing out ---------------------------------------------------------------------------

    def take(self, limit: int, timeout: float) -> list[Arrival]:
        """Up to ``limit`` complete photos, oldest first; waits up to ``timeout`` seconds for the
        first, and returns an empty list when none completed by then."""
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() >= self._next_rescan:
                self.rescan()
            ready = self._complete(limit)
            if ready:
                return ready
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with self._changed:
                self._changed.wait(min(remaining, self._tick()))

    def pending(self) -> int:
        """Files noticed and not yet complete."""
        with self._changed:
            return len(self._candidates)

    def _tick(self) -> float:
        return max(0.02, min(0.25, self.settle / 4))

    def _complete(self, limit: int) -> list[Arrival]:
        with self._changed:
            candidates = sorted(self._candidates.items(), key=lambda item: item[1].seen)
        ready: list[Arrival] = []
        for path, candidate in candidates:
            if len(ready) >= limit:
                break
            reason = self._why_complete(path, candidate)
            if reason is None:
                continue
            with self._changed:
                if self._candidates.get(path) is not candidate:
                    continue
                del self._candidates[path]
                if candidate.stamp is not None:
                    self._handed[path] = candidate.stamp
            ready.append(Arrival(path, candidate.seen, time.monotonic(), reason))
        return ready

    def _why_complete(self, path: Path, candidate: _Candidate) -> str | None:
        current = stamp(path)
        now = time.monotonic()
        if current is None:  # gone, or no longer a file
            with self._changed:
                if self._candidates.get(path) is candidate:
                    del self._candidates[path]
            return None
        if current != candidate.stamp:
            with self._changed:
                candidate.stamp, candidate.changed, candidate.renamed, candidate.unfinished = current, now, False, False
            return None
        if candidate.renamed:
            return "renamed"
        quiet = now - candidate.changed
        if quiet < self.settle:
            return None
        try:
            whole = ends_complete(path)
        except OSError:
            return None
        if whole:
            return "settled"
        if quiet >= self.stale:
            return "stale"
        if not candidate.unfinished:
            candidate.unfinished = True
            if self.on_notice is not None:
                self.on_notice(path, "unfinished")
        return None
