"""PNG pixels from libspng are Pillow's, for every kind of PNG, damaged files and size limits included.

Each test reads the same file with the fast path switched off (Pillow alone, as before) and on,
and compares: identical pixels, or the same ImageLoadError. Files are written here byte by byte
(Pillow cannot write interlaced, 2- or 4-bit or 16-bit colour PNGs).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import MVTEC_BOTTLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from patchcore.engine import png_decoding
from patchcore.engine.images import TooManyPixels, read_image
from patchcore.errors import ImageLoadError

pytest.importorskip("imagecodecs", reason="the fast PNG path needs the fast-png extra (imagecodecs)")

_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _rows(samples: np.ndarray, depth: int) -> bytes:
    """Scanlines of ``samples`` (rows, columns, channels), each with filter byte 0 (none)."""
    if depth == 16:
        packed = [row.astype(">u2").tobytes() for row in samples]
    elif depth == 8:
        packed = [row.astype(np.uint8).tobytes() for row in samples]
    else:
        per_byte = 8 // depth
        packed = []
        for row in samples.reshape(len(samples), -1).astype(np.uint8):
            padded = np.zeros(-(-len(row) // per_byte) * per_byte, np.uint8)
            padded[: len(row)] = row
            groups = padded.reshape(-1, per_byte)
            packed.append(sum(groups[:, i] << (8 - depth * (i + 1)) for i in range(per_byte)).astype(np.uint8).tobytes())
    return b"".join(b"\x00" + row for row in packed)


def png_file(samples: np.ndarray, depth: int, colour: int, *, interlaced: bool = False, palette: np.ndarray | None = None,
             before: list[tuple[bytes, bytes]] = (), after: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A PNG of ``samples`` (rows, columns[, channels]) at ``depth`` bits, PNG colour type ``colour``;
    ``before``/``after``: extra chunks before the palette and image data / after the image data."""
    samples = samples.reshape(samples.shape[0], samples.shape[1], -1)
    height, width = samples.shape[:2]
    if interlaced:
        data = b"".join(_rows(samples[y::dy, x::dx], depth) for x, y, dx, dy in _ADAM7 if samples[y::dy, x::dx].size)
    else:
        data = _rows(samples, depth)
    parts = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlaced)))]
    parts += [_chunk(kind, body) for kind, body in before if kind != b"tRNS"]
    if palette is not None:
        parts.append(_chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes()))
    parts += [_chunk(kind, body) for kind, body in before if kind == b"tRNS"]  # tRNS follows PLTE
    parts += [_chunk(b"IDAT", zlib.compress(data)), *(_chunk(kind, body) for kind, body in after), _chunk(b"IEND", b"")]
    return b"".join(parts)


def _kind(colour: int, depth: int, *, interlaced: bool = False, transparency: bool = False, seed: int = 0) -> bytes:
    """A 13x17 PNG of random samples of one kind (odd sizes exercise the bit packing and Adam7)."""
    rng = np.random.default_rng(seed)
    colours = min(2**depth, 200)
    top = colours - 1 if colour == 3 else 2**depth - 1
    samples = rng.integers(0, top + 1, (13, 17, _CHANNELS[colour]))
    palette = rng.integers(0, 256, (colours, 3)) if colour == 3 else None
    before = []
    if transparency:
        before.append((b"tRNS", bytes([0, 128, 255][:colours]) if colour == 3 else struct.pack(">" + "H" * _CHANNELS[colour],
                                                                                  *[5] * _CHANNELS[colour])))
    return png_file(samples, depth, colour, interlaced=interlaced, palette=palette, before=before)


def _outcome(data: bytes | Path, fast: bool, **options):
    """``read_image``'s pixels, or its ImageLoadError's message, with the fast path ``fast``."""
    png_decoding.ENABLED = fast
    try:
        return np.asarray(read_image(data, **options))
    except ImageLoadError as error:
        return f"{type(error).__name__}: {error}"
    finally:
        png_decoding.ENABLED = True


def assert_same_as_pillow(data: bytes | Path, **options) -> None:
    pillow, fast = _outcome(data, False, **options), _outcome(data, True, **options)
    if isinstance(pillow, str) or isinstance(fast, str):
        assert fast == pillow
    else:
        assert fast.dtype == pillow.dtype and fast.shape == pillow.shape
        np.testing.assert_array_equal(fast, pillow)


def _decoded_by_libspng(data: bytes) -> bool:
    layout = png_decoding.png_layout(data)
    return layout is not None and png_decoding.decode_png(data, layout) is not None


ROUTED = [(0, 1), (0, 2), (0, 4), (0, 8), (2, 8), (3, 1), (3, 2), (3, 4), (3, 8), (6, 8), (6, 16)]
LEFT_TO_PILLOW = [(0, 16), (2, 16), (4, 8), (4, 16)]  # libspng's binding cannot give these


@pytest.mark.parametrize("interlaced", [False, True], ids=["plain", "interlaced"])
@pytest.mark.parametrize("transparency", [False, True], ids=["opaque", "tRNS"])
@pytest.mark.parametrize("colour, depth", ROUTED, ids=[f"type{c}-{d}bit" for c, d in ROUTED])
def test_every_kind_libspng_decodes_gives_pillows_pixels(colour, depth, interlaced, transparency):
    data = _kind(colour, depth, interlaced=interlaced, transparency=transparency and colour in (0, 2, 3))
    assert _decoded_by_libspng(data)
    assert_same_as_pillow(data)


@pytest.mark.parametrize("colour, depth", LEFT_TO_PILLOW, ids=[f"type{c}-{d}bit" for c, d in LEFT_TO_PILLOW])
def test_kinds_libspng_cannot_give_stay_with_pillow(colour, depth):
    data = _kind(colour, depth, interlaced=True)
    assert not _decoded_by_libspng(data)
    assert_same_as_pillow(data)


def test_files_and_bytes_alike(tmp_path):
    data = _kind(2, 8, seed=3)
    (tmp_path / "photo.png").write_bytes(data)
    assert_same_as_pillow(tmp_path / "photo.png")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "photo.png")), np.asarray(read_image(data)))
    assert read_image(tmp_path / "photo.png").info["original_size"] == (17, 13)


def test_16_bit_rules_are_kept():
    """16-bit grayscale (sBIT 12: values 0-4095 are white at 4095) stays with Pillow and its
    bit-depth rules; 16-bit RGBA goes to libspng and keeps Pillow's high byte."""
    ramp = (np.arange(13 * 17).reshape(13, 17) * 4095 // (13 * 17 - 1)).astype(np.uint16)  # 0..4095
    camera = png_file(ramp, 16, 0, before=[(b"sBIT", bytes([12]))])
    assert np.asarray(read_image(camera))[..., 0].max() == 255
    assert_same_as_pillow(camera)
    rgba = np.random.default_rng(1).integers(0, 65536, (13, 17, 4))
    deep = png_file(rgba, 16, 6)
    assert _decoded_by_libspng(deep)
    np.testing.assert_array_equal(np.asarray(read_image(deep)), (rgba[..., :3] >> 8).astype(np.uint8))
    assert_same_as_pillow(deep)


def test_gamma_colour_profile_and_text_chunks_are_ignored_as_pillow_does():
    samples = np.random.default_rng(2).integers(0, 256, (13, 17, 3))
    chunks = [(b"gAMA", struct.pack(">I", 45455)), (b"cHRM", bytes(32)), (b"sRGB", b"\x00"),
              (b"iCCP", b"profile\x00\x00" + zlib.compress(b"not really a profile")), (b"tEXt", b"Comment\x00made here")]
    data = png_file(samples, 8, 2, before=chunks, after=[(b"tEXt", b"Software\x00a test")])
    assert _decoded_by_libspng(data)
    assert_same_as_pillow(data)
    np.testing.assert_array_equal(np.asarray(read_image(data)), samples.astype(np.uint8))


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("where", ["before", "after"])
def test_exif_orientation_is_applied_as_pillow_does(where):
    """An eXIf chunk (before or after the image data) or an XMP or raw-profile text turns the photo;
    such files go to Pillow, which reads them all."""
    samples = np.random.default_rng(4).integers(0, 256, (13, 17, 3))
    data = png_file(samples, 8, 2, **{where: [(b"eXIf", _exif(6))]})
    assert png_decoding.png_layout(data).pillow_only == "EXIF orientation"
    assert read_image(data).size == (13, 17)  # turned upright: 13 wide, 17 high
    assert_same_as_pillow(data)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    for chunk in ((b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp), (b"tEXt", b"XML:com.adobe.xmp\x00" + xmp)):
        data = png_file(samples, 8, 2, **{where: [chunk]})
        assert png_decoding.png_layout(data).pillow_only == "EXIF orientation"
        assert_same_as_pillow(data)


def test_pillow_written_exif_png_reads_upright(tmp_path):
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (20, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "turned.png", exif=_exif(6))
    assert read_image(tmp_path / "turned.png").size == (20, 40)
    assert_same_as_pillow(tmp_path / "turned.png")


def test_animated_png_stays_with_pillow():
    samples = np.random.default_rng(6).integers(0, 256, (13, 17, 3))
    data = png_file(samples, 8, 2, before=[(b"acTL", struct.pack(">II", 1, 0))])
    assert png_decoding.png_layout(data).pillow_only == "animated PNG"
    assert_same_as_pillow(data)


def _damage_cases() -> list[bytes]:
    rng = np.random.default_rng(7)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buffer, "PNG")
    return [buffer.getvalue(), _kind(3, 4, interlaced=True, transparency=True), _kind(0, 8, seed=8)]


@pytest.mark.parametrize("original", _damage_cases(), ids=["rgb", "palette-interlaced", "gray"])
def test_truncated_files_fail_or_decode_as_with_pillow(original):
    for end in [*range(1, 80, 3), *range(len(original) - 40, len(original))]:
        assert_same_as_pillow(original[:end])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(_damage_cases()), where=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_corrupt_bytes_fail_or_decode_as_with_pillow(case, where, flip):
    damaged = bytearray(case)
    damaged[8 + int(where * (len(case) - 8))] ^= flip
    assert_same_as_pillow(bytes(damaged))


def test_a_corrupt_file_names_the_file(tmp_path):
    data = bytearray(_kind(2, 8))
    data[-20] ^= 0xFF  # inside the image data: its checksum no longer matches
    (tmp_path / "broken.png").write_bytes(bytes(data[:-30]))
    with pytest.raises(ImageLoadError, match="broken.png: corrupt or truncated"):
        read_image(tmp_path / "broken.png")
    assert_same_as_pillow(tmp_path / "broken.png")


def _claims_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    return png_file(np.zeros((1, 1, 3), np.uint8), 8, 2).replace(
        _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)),
        _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))


def test_size_limits_are_checked_from_the_header_before_decoding(monkeypatch):
    bomb = _claims_size(10000, 5000)  # within Pillow's limit, beyond the caller's
    with pytest.raises(TooManyPixels, match=r"<image 0>: image of 10000x5000 pixels is too large to decode safely \(limit"):
        read_image(bomb, max_pixels=40_000_000)
    assert_same_as_pillow(bomb, max_pixels=40_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own bomb limit
    with pytest.raises(TooManyPixels, match="image is too large to decode safely"):
        read_image(_claims_size(40, 40))
    assert_same_as_pillow(_claims_size(40, 40))


def test_pillow_decodes_everything_when_switched_off():
    data = _kind(2, 8, seed=10)
    png_decoding.ENABLED = False
    try:
        assert not png_decoding.available() and png_decoding.decode_png(data, png_decoding.png_layout(data)) is None
    finally:
        png_decoding.ENABLED = True
    assert png_decoding.available()


def test_non_png_data_has_no_layout():
    assert png_decoding.png_layout(b"\xff\xd8\xff\xe0 a jpeg") is None
    assert png_decoding.png_layout(b"\x89PNG\r\n\x1a\n" + _chunk(b"tEXt", b"no header first") + bytes(20)) is None


@pytest.mark.skipif(not MVTEC_BOTTLE.is_dir(), reason="MVTec AD bottle is not in shared/data")
def test_real_bottle_photos_decode_as_with_pillow():
    photos = sorted((MVTEC_BOTTLE / "train" / "good").glob("*.png"))[:2] + sorted((MVTEC_BOTTLE / "test").glob("*/000.png"))
    for photo in photos:
        assert _decoded_by_libspng(photo.read_bytes()), photo
        assert_same_as_pillow(photo)
