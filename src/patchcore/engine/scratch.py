"""The scratch directory that holds large temporary files, and whether it secretly uses RAM.

Fitting keeps every training patch in a temporary file (:class:`~patchcore.engine.patch_store.PatchStore`)
so that memory stays bounded. On many Linux machines and containers the default temporary
directory (``TMPDIR``, ``/tmp``) or ``/dev/shm`` is a tmpfs: files there live in RAM, and a
large fit then takes the very memory the file was meant to spare. This module finds that out
from the kernel's mount table and warns once per directory, saying how to move the files.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

#: File systems whose files live in memory.
RAM_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})
MOUNTINFO = Path("/proc/self/mountinfo")

_warned: set[str] = set()


class RamBackedScratchWarning(UserWarning):
    """Large temporary files are about to go to a RAM-backed directory."""


def scratch_directory(directory: str | os.PathLike | None = None) -> str:
    """``directory`` as an absolute path, or, for ``None``, the temporary directory Python uses
    (``TMPDIR``, else the platform's default)."""
    return os.path.realpath(directory if directory is not None else tempfile.gettempdir())


def file_system_type(directory: str | os.PathLike) -> str | None:
    """The type of the file system ``directory`` lives on (``ext4``, ``tmpfs``, ...), from the
    longest mount point that contains it in ``/proc/self/mountinfo``; None where there is no such
    table (not Linux) or it cannot be read."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        table = MOUNTINFO.read_text()
    except OSError:
        return None
    path = os.path.realpath(directory)
    best, found = "", None
    for line in table.splitlines():
        # id parent major:minor root mount-point options [optional fields...] - type source super-options
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        mount_point = _unescape(fields[4])
        kind = fields[fields.index("-", 6) + 1]
        inside = mount_point == "/" or path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):  # ">=": a later mount over the same point hides the earlier
            best, found = mount_point, kind
    return found


def is_ram_backed(directory: str | os.PathLike) -> bool:
    """Whether files in ``directory`` live in RAM (tmpfs or ramfs). Always False outside Linux,
    where there is no mount table to tell."""
    return file_system_type(directory) in RAM_FILE_SYSTEMS


def warn_if_ram_backed(directory: str | os.PathLike | None, what: str, stacklevel: int = 2) -> None:
    """Warn (once per directory and process) when ``what`` is about to be written to a RAM-backed
    ``directory`` (``None``: the default temporary directory), naming the directory, the memory
    it may take (the file system's free space) and how to choose another."""
    path = scratch_directory(directory)
    if path in _warned or not is_ram_backed(path):
        return
    _warned.add(path)
    try:
        free = f"up to {shutil.disk_usage(path).free / 2**30:.1f} GiB of RAM (the free space there)"
    except OSError:
        free = "RAM"
    warnings.warn(
        f"{path} is a RAM-backed file system ({file_system_type(path)}): {what} written there take {free} "
        "instead of disk space. Pass --scratch-dir (command line) or scratch_dir= (PatchCore) to put them "
        "on a disk.",
        RamBackedScratchWarning,
        stacklevel=stacklevel + 1,
    )


def _unescape(field: str) -> str:
    """A mount-table field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)
