"""Files written whole or not at all: under a temporary name beside the target, flushed, then
renamed into place. Every temporary name is listed in :data:`PENDING_TEMPORARY` before the file
exists, so that a process stopped by a signal removes whatever it was writing
(:mod:`patchcore.cli.interrupts`)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

#: Temporary files being written right now.
PENDING_TEMPORARY: set[Path] = set()


def temporary_name(directory: Path, stem: str) -> Path:
    """A fresh hidden temporary file name in ``directory``, registered before the file exists."""
    temporary = Path(directory) / f".{stem}-{secrets.token_hex(8)}.tmp"
    PENDING_TEMPORARY.add(temporary)
    return temporary


@contextlib.contextmanager
def writing(temporary: Path) -> Iterator[Path]:
    """Remove ``temporary`` (a :func:`temporary_name`) when the block ends, however it ends: after a
    rename into place there is nothing left to remove."""
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)
        PENDING_TEMPORARY.discard(temporary)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path to write ``path``'s new contents to; renamed onto ``path`` when the block
    ends without an error (flushed to disk first with ``durable``), removed otherwise."""
    path = Path(path)
    with writing(temporary_name(path.parent, path.name)) as temporary:
        yield temporary
        if durable:
            fd = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(temporary, path)
