"""Model directories: tensors in safetensors files, settings in JSON, never a pickle.

Layout of a model directory::

    patchcore.json                    manifest: format, version, settings, files and their SHA-256
    memory_bank-<sha256[:16]>.safetensors
    backbone-<sha256[:16]>.safetensors

Saving is atomic: the tensor files get new content-addressed names, are flushed to disk, and only
then does ``patchcore.json`` replace the old manifest in one rename; files of the previous model
are removed afterwards. A crash at any point leaves either the old model or the new one, whole.
Loading checks the format, the version and every file's checksum before reading a tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from ..errors import ModelFormatError

FORMAT_NAME = "patchcore-model"
#: The format of ``patchcore export``: the network as an ONNX (or OpenVINO) graph instead of torch weights.
EXPORT_FORMAT_NAME = "patchcore-export"
FORMAT_VERSION = 2
#: Versions this code reads: 1 (before whole-image geometry; its settings name resize and crop explicitly).
READABLE_VERSIONS = (1, 2)
MANIFEST = "patchcore.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store(directory: Path, role: str, suffix: str, write) -> dict[str, Any]:
    """Write a file with ``write(path)``, flush it, and give it its content-addressed name."""
    with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{role}-", suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        write(temporary)
        _fsync(temporary)
        checksum = _sha256(temporary)
        final = directory / f"{role}-{checksum[:16]}{suffix}"
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return {"file": final.name, "sha256": checksum, "bytes": final.stat().st_size}


def write_model(
    directory: str | os.PathLike,
    settings: dict[str, Any],
    state: dict[str, Any],
    tensors: dict[str, dict[str, np.ndarray]],
    extra: dict[str, Any] | None = None,
    blobs: dict[str, tuple[str, bytes]] | None = None,
    format_name: str = FORMAT_NAME,
) -> Path:
    """Write a model directory: ``tensors`` maps a file role to the arrays of its safetensors file,
    ``blobs`` a role to ``(suffix, bytes)`` of another file (an ONNX graph, say)."""
    from .. import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, contents in tensors.items():
        arrays = {k: np.ascontiguousarray(v) for k, v in contents.items()}
        files[role] = _store(directory, role, ".safetensors", lambda path, arrays=arrays: save_file(arrays, str(path)))
    for role, (suffix, data) in (blobs or {}).items():
        files[role] = _store(directory, role, suffix, lambda path, data=data: path.write_bytes(data))
    manifest = {
        "format": format_name,
        "format_version": FORMAT_VERSION,
        "patchcore_version": __version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        "state": state,
        "files": files,
        **(extra or {}),
    }
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".manifest-", suffix=".tmp", delete=False) as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
        temporary = Path(handle.name)
    os.replace(temporary, directory / MANIFEST)  # the commit point
    _fsync(directory)
    keep = {MANIFEST, *(entry["file"] for entry in files.values())}
    for stale in directory.iterdir():
        if stale.is_file() and stale.name not in keep and stale.name.split("-")[0] in files:
            stale.unlink(missing_ok=True)  # a file of the previous model (same role, other content)
    return directory


def model_sha256(directory: str | os.PathLike) -> str:
    """The SHA-256 of a model directory's manifest: it names every file by its own SHA-256, so it
    identifies the model version exactly (scores written by two different versions never share it)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ModelFormatError(f"{directory}: no {MANIFEST}; not a patchcore model directory")
    return _sha256(path)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of a model directory (format and version known)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ModelFormatError(f"{directory}: model directory not found")
    if not path.is_file():
        raise ModelFormatError(f"{directory}: no {MANIFEST}; not a patchcore model directory")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from exc
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


def read_model(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, Path]]:
    """The manifest, the arrays of each safetensors file and the paths of the other files of a
    model directory, after checking every file's SHA-256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors, paths = {}, {}
    for role, entry in manifest["files"].items():
        path = directory / str(entry.get("file", ""))
        if not path.is_file() or path.parent != directory:
            raise ModelFormatError(f"{path}: file of the model is missing")
        if _sha256(path) != entry.get("sha256"):
            raise ModelFormatError(f"{path}: checksum does not match the manifest; the file was altered or damaged")
        if path.suffix != ".safetensors":
            paths[role] = path
            continue
        try:
            tensors[role] = load_file(str(path))
        except Exception as exc:
            raise ModelFormatError(f"{path}: unreadable safetensors file ({exc})") from exc
    return manifest, tensors, paths
