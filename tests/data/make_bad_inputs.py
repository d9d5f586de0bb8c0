"""Write the corpus of awkward and hostile uploads in ``tests/data/bad_inputs/`` (all a few KB at most).

Run from anywhere: ``python tests/data/make_bad_inputs.py``. The output is deterministic; the files
are committed so that the tests do not depend on this script.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "bad_inputs"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG with valid chunks and CRCs whose IHDR declares ``width`` x ``height`` 8-bit grayscale;
    the IDAT holds only the first rows (decoding all of it would need 900 MB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes(width) for _ in range(4))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")


def _gradient(height: int = 96, width: int = 80) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1).astype(np.uint8)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def corpus() -> dict[str, bytes]:
    rgb = Image.fromarray(_gradient())
    png, jpeg = _png(rgb), _jpeg(rgb)
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 16] = b"\xff" * 16  # damaged IDAT: CRC no longer matches
    y, x = np.mgrid[0:64, 0:72]
    sixteen = ((x * 900 + y * 100) % 65536).astype(np.uint16)
    rgba = np.dstack([_gradient(64, 64), np.full((64, 64), 128, np.uint8)])
    return {
        # must be refused with a clear 4xx
        "not_an_image.txt": b"This is a text file, not an image.\n",
        "zero_bytes.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.png": bytes(corrupt),
        "bomb_30000x30000.png": bomb_png(),
        "thin_1x20000.png": _png(Image.new("L", (20000, 1), 128)),  # resize would make it 64 x 1.28 M
        "gif_not_accepted.gif": _gif(rgb),
        # must work
        "gray16.png": _png(Image.fromarray(sixteen)),  # mode I;16
        "rgba.png": _png(Image.fromarray(rgba, mode="RGBA")),
        "gray.png": _png(Image.fromarray(_gradient(64, 64)[:, :, 0], mode="L")),
        "ok.jpg": jpeg,
    }


def _gif(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="GIF")
    return buffer.getvalue()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in corpus().items():
        (OUT / name).write_bytes(data)
        print(f"{name:28s} {len(data):6d} bytes")


if __name__ == "__main__":
    main()
