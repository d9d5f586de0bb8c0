"""SHA-256 of an image as it was given, so that a model's history says exactly what it was taught."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

#: Where a decoder that had the file's bytes (the service, for an upload) leaves their SHA-256.
SHA256_INFO = "sha256"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_sha256(source) -> str:
    """The SHA-256 of an image source: of the file's bytes for a path (or a decoded upload that
    carries it in ``info["sha256"]``), else of the pixels with their shape and type."""
    if isinstance(source, (str, os.PathLike)):
        return file_sha256(Path(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(source).hexdigest()
    if isinstance(source, Image.Image):
        if source.info.get(SHA256_INFO):
            return str(source.info[SHA256_INFO])
        source = np.asarray(source)
    array = np.ascontiguousarray(source)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()
