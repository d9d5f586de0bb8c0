"""Model directories: tensors in safetensors files, settings in JSON, never a pickle; every
change a new version that can be restored.

Layout of a model directory::

    patchcore.json                    manifest of the current version: format, settings, state,
                                      files and their SHA-256, version number and what made it
    memory_bank-<sha256[:16]>.safetensors
    backbone-<sha256[:16]>.safetensors
    versions/000007.json              the manifests of the last ``keep_versions`` versions
    history.jsonl                     one line per version ever written: when, what, who (append-only)
    .lock                             taken by every writer (several processes may serve one model)

Saving is atomic: the tensor files get content-addressed names (a version that did not change
the backbone shares its file), are flushed to disk, and only then does ``patchcore.json``
replace the old manifest in one rename. A crash at any point leaves either the old model or the
new one, whole. Files that no kept version names are removed afterwards. Loading checks the
format, the version and every file's checksum before reading a tensor. :func:`rollback` makes a
kept version current again, as a new version (the history only grows).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from safetensors.numpy import load_file, save_file

from ..errors import ModelFormatError
from .atomic_files import PENDING_TEMPORARY, atomic_path, temporary_name, writing
from .digest import file_sha256

FORMAT_NAME = "patchcore-model"
#: The format of ``patchcore export``: the network as an ONNX (or OpenVINO) graph instead of torch weights.
EXPORT_FORMAT_NAME = "patchcore-export"
FORMAT_VERSION = 6
#: Versions this code reads: 1 (before whole-image geometry; its settings name resize and crop
#: explicitly), 2 (exports without the coreset's settings), 3 (every setting, model versions),
#: 4 (the settings ``augment`` and ``aggregation``; a format 3 file takes the values that reproduce
#: it: :func:`~patchcore.engine.settings.read_settings`), 5 (the setting ``network_precision``;
#: older files ran float32), 6 (the calibration settings ``calibration``, ``calibration_photos``,
#: ``max_fpr`` and ``max_pixel_fpr``; older files were not calibrated at fit).
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
MANIFEST = "patchcore.json"
VERSIONS = "versions"
HISTORY = "history.jsonl"
LOCK = ".lock"
#: Versions a model directory keeps restorable by default.
KEEP_VERSIONS = 10

def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk. Directories cannot be opened for that on
    Windows (nor on some network file systems): there the rename itself is what is durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def model_lock(directory: str | os.PathLike) -> FileLock:
    """The lock every writer of a model directory holds (re-entrant within a thread; exclusive
    between threads and processes). Hold it around read-change-write (teach-in) so that two
    writers never overwrite each other's version."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(directory / LOCK, is_singleton=True)


def _store(directory: Path, role: str, suffix: str, write) -> dict[str, Any]:
    """Write a file with ``write(path)``, flush it, and give it its content-addressed name."""
    with writing(temporary_name(directory, role)) as temporary:
        write(temporary)
        _fsync(temporary)
        checksum = file_sha256(temporary)
        final = directory / f"{role}-{checksum[:16]}{suffix}"
        os.replace(temporary, final)
    return {"file": final.name, "sha256": checksum, "bytes": final.stat().st_size}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON next to ``path``, flush it, and rename it into place (atomic)."""
    with atomic_path(path, durable=True) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def _version_path(directory: Path, version: int) -> Path:
    return directory / VERSIONS / f"{version:06d}.json"


def _commit(directory: Path, manifest: dict[str, Any], event: dict[str, Any], keep_versions: int) -> None:
    """Make ``manifest`` the current version: archive it, rename it into place, log it, prune.
    The caller holds the model lock."""
    (directory / VERSIONS).mkdir(exist_ok=True)
    archived = _version_path(directory, manifest["version"])
    _write_json(archived, manifest)
    try:
        _write_json(directory / MANIFEST, manifest)  # the commit point
    except BaseException:
        archived.unlink(missing_ok=True)  # never committed: not a version to restore
        raise
    _fsync(directory)
    line = {"version": manifest["version"], "at": manifest["saved_at"], **event,
            "manifest_sha256": file_sha256(directory / MANIFEST)}
    with open(directory / HISTORY, "a", encoding="utf-8") as log:
        log.write(json.dumps(line, sort_keys=True) + "\n")
        log.flush()
        os.fsync(log.fileno())
    _prune(directory, keep_versions)


def _current_version(directory: Path) -> int:
    """The current version's number (0: no model yet). A directory written before versions
    existed counts as version 1, archived first so that it can be restored."""
    if not (directory / MANIFEST).is_file():
        return 0
    manifest = read_manifest(directory)
    version = int(manifest.get("version", 1))
    if not _version_path(directory, version).is_file():
        (directory / VERSIONS).mkdir(exist_ok=True)
        _write_json(_version_path(directory, version), {**manifest, "version": version})
    return version


def _prune(directory: Path, keep_versions: int) -> None:
    """Keep the last ``keep_versions`` versions (and the current one) restorable; remove the
    archived manifests before them and every file that no kept version names."""
    archived = sorted(_archived_versions(directory))
    for version in archived[:-keep_versions]:
        _version_path(directory, version).unlink(missing_ok=True)
    kept = [json.loads(_version_path(directory, v).read_text()) for v in archived[-keep_versions:]]
    kept.append(json.loads((directory / MANIFEST).read_text()))
    needed = {entry["file"] for manifest in kept for entry in manifest["files"].values()}
    roles = {role for manifest in kept for role in manifest["files"]}
    for path in directory.iterdir():
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp") and path not in PENDING_TEMPORARY:
            path.unlink(missing_ok=True)  # left by a writer that died (writers hold the lock: none runs now)
        elif path.name not in needed and path.name.split("-")[0] in roles:
            path.unlink(missing_ok=True)


def _archived_versions(directory: Path) -> list[int]:
    folder = directory / VERSIONS
    if not folder.is_dir():
        return []
    return [int(path.stem) for path in folder.glob("*.json") if path.stem.isdigit()]


def write_model(
    directory: str | os.PathLike,
    settings: dict[str, Any],
    state: dict[str, Any],
    tensors: dict[str, dict[str, np.ndarray]],
    extra: dict[str, Any] | None = None,
    blobs: dict[str, tuple[str, bytes]] | None = None,
    format_name: str = FORMAT_NAME,
    event: dict[str, Any] | None = None,
    keep_versions: int = KEEP_VERSIONS,
) -> Path:
    """Write a new version of a model directory: ``tensors`` maps a file role to the arrays of
    its safetensors file, ``blobs`` a role to ``(suffix, bytes)`` of another file (an ONNX graph,
    say); ``event`` says what made this version (``action``, ``who`` and details), for the history."""
    from .. import __version__

    if keep_versions < 1:
        raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
    directory = Path(directory)
    with model_lock(directory):
        version = _current_version(directory) + 1
        files = {}
        for role, contents in tensors.items():
            arrays = {k: np.ascontiguousarray(v) for k, v in contents.items()}
            files[role] = _store(directory, role, ".safetensors", lambda path, arrays=arrays: save_file(arrays, str(path)))
        for role, (suffix, data) in (blobs or {}).items():
            files[role] = _store(directory, role, suffix, lambda path, data=data: path.write_bytes(data))
        event = {"action": "save", "who": "library", **(event or {})}
        manifest = {
            "format": format_name,
            "format_version": FORMAT_VERSION,
            "patchcore_version": __version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": version,
            "event": event,
            "settings": settings,
            "state": state,
            "files": files,
            **(extra or {}),
        }
        _commit(directory, manifest, event, keep_versions)
    return directory


def model_sha256(directory: str | os.PathLike) -> str:
    """The SHA-256 of a model directory's manifest: it names every file by its own SHA-256, so it
    identifies the model version exactly (scores written by two different versions never share it)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ModelFormatError(f"{directory}: no {MANIFEST}; not a patchcore model directory")
    return file_sha256(path)


def _check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT_NAME, EXPORT_FORMAT_NAME):
        raise ModelFormatError(f"{path}: not a patchcore model manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFormatError(
            f"{path}: model format version {version!r} is not supported by this patchcore "
            f"(supports versions {', '.join(map(str, READABLE_VERSIONS))}); save the model again with a matching patchcore"
        )
    for key in ("settings", "state", "files"):
        if not isinstance(manifest.get(key), dict):
            raise ModelFormatError(f"{path}: manifest lacks its {key!r} section")
    return manifest


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from exc


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of a model directory's current version (format and version known)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ModelFormatError(f"{directory}: model directory not found")
    if not path.is_file():
        raise ModelFormatError(f"{directory}: no {MANIFEST}; not a patchcore model directory")
    return _check_manifest(_read_json(path), path)


def manifest_version(manifest: dict[str, Any]) -> int:
    """The model version a manifest describes (1 for directories written before versions existed)."""
    return int(manifest.get("version", 1))


def _check_files(directory: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """The path of each file of ``manifest``, after checking that it exists and its SHA-256."""
    paths = {}
    for role, entry in manifest["files"].items():
        path = directory / str(entry.get("file", ""))
        if not path.is_file() or path.parent != directory:
            raise ModelFormatError(f"{path}: file of the model is missing")
        if file_sha256(path) != entry.get("sha256"):
            raise ModelFormatError(f"{path}: checksum does not match the manifest; the file was altered or damaged")
        paths[role] = path
    return paths


def read_model(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, Path]]:
    """The manifest, the arrays of each safetensors file and the paths of the other files of a
    model directory's current version, after checking every file's SHA-256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors, paths = {}, {}
    for role, path in _check_files(directory, manifest).items():
        if path.suffix != ".safetensors":
            paths[role] = path
            continue
        try:
            tensors[role] = load_file(str(path))
        except Exception as exc:
            raise ModelFormatError(f"{path}: unreadable safetensors file ({exc})") from exc
    return manifest, tensors, paths


def history(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every version written to a model directory, oldest first: the history log's lines (version,
    at, action, who, details, manifest_sha256), each with ``restorable`` (its manifest is kept) and
    ``current``. A directory from before versions existed shows its one version."""
    directory = Path(directory)
    current = manifest_version(read_manifest(directory))
    entries: list[dict[str, Any]] = []
    log = directory / HISTORY
    if log.is_file():
        for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                raise ModelFormatError(f"{log}: line {number} is not valid JSON") from None
    if not any(entry.get("version") == current for entry in entries):
        manifest = read_manifest(directory)
        entries.append({"version": current, "at": manifest.get("saved_at"), **(manifest.get("event") or {"action": "save"})})
    kept = set(_archived_versions(directory)) | {current}
    for entry in entries:
        entry["restorable"] = entry.get("version") in kept
        entry["current"] = entry.get("version") == current
    return entries


def rollback(directory: str | os.PathLike, to: int | None = None, who: str = "library",
             keep_versions: int = KEEP_VERSIONS, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make version ``to`` (default: the one before the current) the model again, atomically, as a
    new version whose files and state are exactly those of ``to`` (scores equal bit for bit).
    ``who`` and ``details`` go into the history. Returns the new manifest."""
    directory = Path(directory)
    with model_lock(directory):
        current = _current_version(directory)
        if current == 0:
            raise ModelFormatError(f"{directory}: no {MANIFEST}; not a patchcore model directory")
        target = current - 1 if to is None else int(to)
        if target == current:
            raise ValueError(f"{directory}: version {target} is already the current version")
        path = _version_path(directory, target)
        if target < 1 or not path.is_file():
            kept = sorted(_archived_versions(directory))
            raise ValueError(f"{directory}: version {target} cannot be restored (restorable versions: "
                             f"{', '.join(map(str, kept)) or 'none'}; `patchcore history` lists them)")
        old = _check_manifest(_read_json(path), path)
        _check_files(directory, old)
        event = {**(details or {}), "action": "rollback", "who": who, "to_version": target, "from_version": current,
                 "bank_size": (old.get("event") or {}).get("bank_size")}
        manifest = {**old, "version": current + 1, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "event": event}
        _commit(directory, manifest, event, keep_versions)
    return manifest
