"""Decoding PNG photos with libspng (through ``imagecodecs``) where that gives Pillow's pixels exactly.

libspng unfilters rows with SIMD code and decodes without holding the GIL, so PNG decoding costs
less and, in background threads, overlaps the network and the search (pyspng, the other libspng
binding, holds the GIL for the whole decode and so stalls the thread that runs them). Pillow stays
the decoder of every other format and of every PNG this module does not take (:func:`decode_png`
returns None): kinds libspng's binding cannot give (grayscale with alpha, 16-bit grayscale, 16-bit
RGB), files that carry an EXIF orientation or are animated, and files libspng refuses, whose
error Pillow then reports as it always did.

Pixels are those :func:`patchcore.engine.images.read_image` makes with Pillow: colour and
palette PNGs as 8-bit RGB (alpha dropped, no gamma or ICC correction applied, 16-bit samples
reduced to their high byte as Pillow does).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import numpy as np

try:  # the `fast-png` extra
    import imagecodecs
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    imagecodecs = None

#: Whether PNGs are decoded here when libspng is installed; a switch for benchmarks and tests
#: that measure or compare Pillow alone.
ENABLED = True

SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Text-chunk keywords Pillow reads EXIF data from (besides the eXIf chunk): such files go to
#: Pillow, whatever the text holds.
_EXIF_KEYWORDS = frozenset({b"exif", b"Raw profile type exif"})
#: XMP, where Pillow finds an orientation by this pattern (when the EXIF data has none).
_XMP_KEYWORD = b"XML:com.adobe.xmp"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')
_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})
#: Text that Pillow reads without ever failing once the chunk is whole. Pillow parses the chunks
#: after the image data while loading a PNG and fails on some malformed ones; libspng never reads
#: them, so files with any other chunk there (or more text than this) go to Pillow.
_TEXT_LIMIT = 1 << 20

#: (colour type, bit depth) pairs libspng's binding decodes: grayscale up to 8 bits, 8-bit RGB,
#: palette, 8- and 16-bit RGBA. Its other kinds fail there ("invalid format"); libpng decodes
#: them no faster than Pillow (16-bit grayscale 900x900: 10.9 ms against 11.0 ms), so Pillow does.
_LIBSPNG_KINDS = frozenset({(0, 1), (0, 2), (0, 4), (0, 8), (2, 8), (3, 1), (3, 2), (3, 4), (3, 8), (6, 8), (6, 16)})


@dataclass(frozen=True)
class PngLayout:
    """What a PNG's chunks say about decoding it."""

    width: int
    height: int
    depth: int
    colour: int
    #: Why Pillow must decode this file (its result could differ otherwise), or None.
    pillow_only: str | None


def available() -> bool:
    """Whether :func:`decode_png` can decode anything: libspng installed and the switch on."""
    return ENABLED and imagecodecs is not None


def png_layout(data: bytes | bytearray | memoryview) -> PngLayout | None:
    """The header of the PNG file held in ``data`` and whether Pillow must decode it; None when
    it is no PNG or its first chunk is no IHDR.

    Every chunk is looked at (a microsecond or two each), since metadata that turns the photo
    may follow the image data, and so may chunks that make Pillow refuse the file.
    """
    size = len(data)
    if size < 33 or bytes(data[:8]) != SIGNATURE:
        return None
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR" or length != 13:
        return None
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    return PngLayout(width, height, depth, colour, _pillow_only(data))


def _pillow_only(data: bytes | bytearray | memoryview) -> str | None:
    """Why Pillow must decode this PNG (see :data:`PngLayout.pillow_only`), from its chunks."""
    position, size, text, image_seen = 33, len(data), 0, False
    while True:
        if position + 12 > size:
            return "truncated"
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length
        if end > size:
            return "truncated"
        if kind == b"IEND":
            return None
        if kind == b"IDAT":
            image_seen = True
        elif kind in (b"eXIf", b"acTL"):
            return "EXIF orientation" if kind == b"eXIf" else "animated PNG"
        elif kind in _TEXT_CHUNKS:
            body = data[position + 8 : end - 4]
            keyword, _, rest = bytes(body).partition(b"\0")
            compressed = kind == b"zTXt" or (kind == b"iTXt" and rest[:1] != b"\0")
            text += length
            if keyword in _EXIF_KEYWORDS or (keyword == _XMP_KEYWORD and (compressed or _XMP_ORIENTATION.search(rest))):
                return "EXIF orientation"
            if image_seen and compressed:
                return "compressed text after the image data"
            if text > _TEXT_LIMIT:
                return "large text chunks"
        elif image_seen:
            return f"{kind!r} chunk after the image data"
        position = end


def decode_png(data: bytes | bytearray | memoryview, layout: PngLayout) -> np.ndarray | None:
    """The pixels Pillow would give for the PNG in ``data`` (laid out as ``layout`` says), as an
    (H, W, 3) ``uint8`` RGB array; None where Pillow must decode it (see the module's description),
    including any file libspng refuses (corrupt, truncated): Pillow then says what is wrong.
    """
    if not available() or layout.pillow_only or (layout.colour, layout.depth) not in _LIBSPNG_KINDS:
        return None
    try:
        pixels = imagecodecs.spng_decode(data)
    except Exception:  # noqa: BLE001 - libspng refused the file: Pillow decodes it or explains why
        return None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[:2] != (layout.height, layout.width) or pixels.shape[2] not in (1, 3, 4):
        return None  # not what this binding is known to return: leave it to Pillow
    if pixels.dtype == np.uint16:  # Pillow keeps the high byte of 16-bit colour samples
        pixels = (pixels >> 8).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        return None
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])
