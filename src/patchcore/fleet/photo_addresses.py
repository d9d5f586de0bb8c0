"""Training photos named by local paths or by file-system URIs (``s3://``, ``gs://``, ``file://``...),
listed on the driver and read on Ray workers through pyarrow's file systems."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Iterable

from ..engine.images import IMAGE_SUFFIXES, FetchedImage, expand_sources


def is_uri(address: str) -> bool:
    """Whether ``address`` names a file system (``scheme://...``) rather than a local path."""
    scheme, separator, _ = address.partition("://")
    return bool(separator) and scheme.isidentifier() and len(scheme) > 1  # not a Windows drive letter


def photo_addresses(images: Iterable[str | os.PathLike]) -> list[str]:
    """Every training photo: local folders expanded and files made absolute (workers do not share
    the driver's working folder), URI folders listed through pyarrow; URIs otherwise untouched."""
    addresses: list[str] = []
    for item in images:
        text = str(item)
        if is_uri(text):
            addresses.extend(_listed(text))
        else:
            addresses.extend(str(Path(path).resolve()) for path in expand_sources(text))
    if not addresses:
        raise ValueError("no images given")
    return addresses


def _listed(uri: str) -> list[str]:
    """The image files directly in the folder ``uri`` (sorted), or ``[uri]`` when it is a file."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise ValueError(f"{uri}: not found")
    if info.type != fs.FileType.Directory:
        return [uri]
    prefix = uri[: uri.index(path)] if path in uri else uri.partition("://")[0] + "://"
    found = sorted(entry.path for entry in filesystem.get_file_info(fs.FileSelector(path, recursive=False))
                   if entry.type == fs.FileType.File and Path(entry.path).suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ValueError(f"{uri}: no images in this folder")
    return [prefix + entry for entry in found]


def read_uri(uri: str) -> bytes:
    """The bytes of the file at ``uri``."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def photo_source(address: str) -> str | FetchedImage:
    """What the engine reads for ``address``: a local path as it is, a URI fetched when decoded."""
    return FetchedImage(address, partial(read_uri, address)) if is_uri(address) else address
